"""to_torch: our weights load into torch.nn.GRU / GRUCell (strict) and give our numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gru_jax
from gru_jax.interop import from_torch, to_torch

torch.set_num_threads(1)

D, H, T, B = 3, 4, 5, 3
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _tree(seed, **options):
    """gru_jax-initialized params with NumPy-drawn values (shapes from init_gru)."""
    shapes = jax.eval_shape(lambda k: gru_jax.init_gru(k, D, H, **options), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(-0.5, 0.5, a.shape).astype(np.float32)), shapes
    )


def _load(module, state):
    """load_state_dict(strict=True): every torch parameter is given, nothing else."""
    result = module.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return module


# (num_layers, bidirectional, bias, batch_first, h0, lengths): each option value meets others.
_CASES = [
    (1, False, True, True, False, False),
    (1, True, False, False, True, True),
    (2, False, False, True, True, True),
    (2, True, True, False, False, True),
    (3, True, True, True, True, False),
]


@pytest.mark.parametrize("num_layers,bidirectional,bias,batch_first,with_h0,var_len", _CASES)
def test_exported_gru_reproduces_our_outputs_in_torch(
    num_layers, bidirectional, bias, batch_first, with_h0, var_len
):
    seed = num_layers * 10 + bidirectional
    rng = np.random.default_rng(seed)
    tree = _tree(seed, num_layers=num_layers, bidirectional=bidirectional, bias=bias)
    k = 2 if bidirectional else 1
    x = rng.normal(size=(B, T, D) if batch_first else (T, B, D)).astype(np.float32)
    h0 = rng.normal(size=(num_layers * k, B, H)).astype(np.float32) if with_h0 else None
    lengths = np.array([T, 2, 4]) if var_len else None

    out, h_n = jax.jit(
        lambda t, x, h0, n: gru_jax.gru(t, x, h0, lengths=n, batch_first=batch_first)
    )(tree, x, h0, lengths)

    state = to_torch(tree)
    ref = torch.nn.GRU(
        D, H, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional
    )
    _load(ref, state)
    xt = torch.tensor(x)
    h0t = None if h0 is None else torch.tensor(h0)
    with torch.no_grad():
        if lengths is None:
            t_out, t_h = ref(xt, h0t)
        else:
            packed = torch.nn.utils.rnn.pack_padded_sequence(
                xt, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False
            )
            t_out, t_h = ref(packed, h0t)
            t_out, _ = torch.nn.utils.rnn.pad_packed_sequence(
                t_out, batch_first=batch_first, total_length=T
            )
    np.testing.assert_allclose(out, t_out.numpy(), **TOL)
    np.testing.assert_allclose(h_n, t_h.numpy(), **TOL)

    # Both ways, exactly: ours -> torch -> ours, and torch's state dict -> ours -> torch.
    jax.tree.map(np.testing.assert_array_equal, from_torch(ref.state_dict()), tree)
    back = to_torch(from_torch(ref.state_dict()))
    assert back.keys() == ref.state_dict().keys()
    for name, value in ref.state_dict().items():
        np.testing.assert_array_equal(back[name], value.numpy())


@pytest.mark.parametrize("bias", [True, False])
def test_exported_cell_reproduces_our_step_in_torch_grucell(bias):
    cell = gru_jax.cell_of(_tree(3, bias=bias))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(B, D)).astype(np.float32)
    h = rng.normal(size=(B, H)).astype(np.float32)
    want = jax.jit(gru_jax.gru_step)(cell, h, x)

    state = to_torch({"params": cell})
    assert set(state) == (
        {"weight_ih", "weight_hh", "bias_ih", "bias_hh"} if bias else {"weight_ih", "weight_hh"}
    )
    ref = _load(torch.nn.GRUCell(D, H, bias=bias), state)
    with torch.no_grad():
        got = ref(torch.tensor(x), torch.tensor(h))
    np.testing.assert_allclose(want, got.numpy(), **TOL)
    jax.tree.map(np.testing.assert_array_equal, from_torch(ref.state_dict()), cell)
