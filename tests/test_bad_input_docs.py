"""docs/bad_input.md matches the code: every message it quotes is what one call raises.

Each ``ValueError: ...`` / ``TypeError: ...`` quoted in the page must equal the message of
one of the calls below (``L = K = 2, D = 3, H = 4, B = 2, T = 5``), and every call's
message must be quoted in the page, so the table and the code cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gru_jax
from gru_jax import nnx as gnnx
from gru_jax.interop import from_torch

PAGE = Path(__file__).resolve().parent.parent / "docs" / "bad_input.md"
L, K, D, H, B, T = 2, 2, 3, 4, 2, 5
PARAMS = gru_jax.init_gru(jax.random.key(0), D, H, num_layers=L, bidirectional=True)
X = np.ones((B, T, D), np.float32)
TIME_MAJOR = np.ones((T, B, D), np.float32)
LINEN = gru_jax.GRU(H, num_layers=L, bidirectional=True, dropout=0.1)


def gru(x=X, h0=None, **kwargs):
    return gru_jax.gru(PARAMS, x, h0, **kwargs)


def linen(model=LINEN, **kwargs):
    return model.apply({"params": PARAMS}, X, **kwargs)


CALLS = {
    "x rank": lambda: gru(np.zeros((1, B, T, D), np.float32)),
    "x features": lambda: gru(np.zeros((B, T, D + 1), np.float32)),
    "x (B, T)": lambda: gru(np.zeros((B, T), np.float32)),
    "x features not last": lambda: gru(np.zeros((B, D, T), np.float32)),
    "x dtype": lambda: gru(X.astype(np.int32)),
    "h0 shape": lambda: gru(h0=np.zeros((L * K, B + 1, H), np.float32)),
    "h0 swapped": lambda: gru(TIME_MAJOR, np.zeros((L * K, B, H), np.float32)),
    "h0 dtype": lambda: gru(h0=np.zeros((L * K, B, H), np.int32)),
    "lengths dtype": lambda: gru(lengths=np.array([5.0, 2.0], np.float32)),
    "lengths shape": lambda: gru(lengths=np.array([5, 5, 5])),
    "lengths swapped": lambda: gru(TIME_MAJOR, lengths=np.array([5, 2])),
    "lengths values": lambda: gru(lengths=np.array([-1, 5])),
    "dropout": lambda: gru(dropout=1.0),
    "linen mode": lambda: linen(),
    "linen rng": lambda: linen(deterministic=False),
    "linen params": lambda: linen(gru_jax.GRU(H + 1, num_layers=L, bidirectional=True)),
    "nnx stream": lambda: gnnx.GRU(D, H, num_layers=L, dropout=0.1, rngs=nnx.Rngs(params=0))(X),
    "nnx rngs": lambda: gnnx.GRU(D, H, rngs="seed"),
    "sizes": lambda: gru_jax.GRU(0).init(jax.random.key(0), X),
    "impl": lambda: gru(impl="cuda"),
    "impl symbolic": lambda: jax.export.export(jax.jit(lambda x: gru(x, impl="pallas")))(
        jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {T}, {D}"), jnp.float32)
    ),
    "params": lambda: gru_jax.gru({"layer_0": {"w_ih": PARAMS["layer_0"]["w_ih"]}}, X),
    "state_dict": lambda: from_torch({"weight_ih_l0": np.zeros((3 * H, D))}),
    "state_dict prefix": lambda: from_torch(
        {"fc.weight": np.zeros((2, H)), "gru.weight_ih_l0": np.zeros((3 * H, D))}
    ),
    "gru_step": lambda: gru_jax.gru_step(
        gru_jax.cell_of(PARAMS), np.zeros((2, 5), np.float32), X[:, 0]
    ),
    "dtype": lambda: gru(dtype=jnp.int32),
    "unroll": lambda: gru(unroll=0),
}


def raised(call) -> str:
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    return f"{type(info.value).__name__}: {info.value}"


def quoted() -> list[str]:
    return re.findall(r"`((?:ValueError|TypeError): [^`]*)`", PAGE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def messages() -> dict[str, str]:
    return {name: raised(call) for name, call in CALLS.items()}


def test_every_quoted_message_is_raised(messages):
    raised_ = set(messages.values())
    missing = [q for q in quoted() if q not in raised_]
    assert not missing, f"quoted in {PAGE.name} but raised by no call: {missing}"


@pytest.mark.parametrize("name", list(CALLS))
def test_every_error_is_documented(messages, name):
    assert messages[name] in quoted(), f"{name}: {messages[name]!r} is not in {PAGE.name}"
