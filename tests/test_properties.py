"""Property tests of ``gru_jax.gru`` against the float64 NumPy reference (tests/_reference.py).

Hypothesis draws the whole configuration: layers, directions, bias, cell variant, layout,
``B``, ``T`` (from 1), ``D``, ``H``, lengths (0 and ``T`` included), ``h0``, ``unroll``,
``remat`` and the scale of weights and inputs. Array values come from a drawn NumPy seed (fast
to generate; hypothesis shrinks the configuration, the seed replays the numbers).

Examples per test: 4 to 10 (CI-sized: every example compiles a new program; derandomized so
CI is reproducible). ``HYPOTHESIS_PROFILE=heavy`` runs ten times more, drawn at random each
run (~10 minutes of CPU for the file).

Tolerances:

* float64 (``jax.enable_x64``) against the float64 reference: ``atol = rtol = 1e-10``. Both
  compute the same equations in the same precision; the only differences are the order of
  additions inside the matmuls (``D + H + 2`` terms of size at most ~10 here), each step
  ``~1e-15``, through at most 8 steps and 3 layers of a map whose Lipschitz constant is a few
  units: orders of magnitude below ``1e-10``, which still catches any wrong term.
* float32 against the float64 reference (fed the same float32 numbers): ``atol = rtol = 2e-5``.
  float32 ``eps = 1.2e-7``; a pre-activation sums at most ``D + H + 2 = 18`` products of
  magnitude up to ~``scale**2 = 4``, so its rounding error is at most ``~18 * 4 * 1.2e-7 ~
  1e-5`` in the worst case and typically ``sqrt(18) * 1.2e-7 * 4 ~ 2e-6``; ``sigmoid`` and
  ``tanh`` have slope at most 1 and the state update is a convex combination, so a few steps
  and layers do not amplify it much. Observed worst case over 300 random configurations:
  3e-7, so the tolerance has ~70x headroom.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import random_params, reference_gru
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gru_jax

_HEAVY = os.environ.get("HYPOTHESIS_PROFILE") == "heavy"


def _settings(examples: int):
    """CI: ``examples`` derandomized examples; heavy: ten times more, random each run."""
    return settings(
        max_examples=10 * examples if _HEAVY else examples,
        deadline=None,
        derandomize=not _HEAVY,
        suppress_health_check=[HealthCheck.too_slow],
    )


TOL = {np.float32: 2e-5, np.float64: 1e-10}


@st.composite
def configs(draw, *, with_lengths=None):
    """A random GRU configuration and the seed of its arrays.

    ``with_lengths``: ``True`` always draws lengths, ``None`` sometimes.
    """
    cfg = {
        "num_layers": draw(st.integers(1, 3)),
        "bidirectional": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "reset_after": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "batch": draw(st.integers(1, 4)),
        "steps": draw(st.integers(1, 8)),
        "in_features": draw(st.integers(1, 5)),
        "hidden": draw(st.integers(1, 5)),
        "use_h0": draw(st.booleans()),
        "unroll": draw(st.sampled_from([1, 2, 3])),
        "remat": draw(st.booleans()),
        "scale": draw(st.sampled_from([0.5, 1.0, 2.0])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }
    full = st.just(None) if with_lengths is False else st.none()
    some = st.lists(st.integers(0, cfg["steps"]), min_size=cfg["batch"], max_size=cfg["batch"]).map(
        lambda v: np.asarray(v, np.int32)
    )
    cfg["lengths"] = draw(some if with_lengths else (full | some))
    return cfg


def make_inputs(cfg, dtype=np.float32):
    """NumPy params tree, ``x`` (in the configured layout), ``h0`` (or None), lengths."""
    rng = np.random.default_rng(cfg["seed"])
    num_dirs = 2 if cfg["bidirectional"] else 1
    hidden, scale = cfg["hidden"], cfg["scale"]
    params = random_params(
        rng,
        cfg["in_features"],
        hidden,
        num_layers=cfg["num_layers"],
        bidirectional=cfg["bidirectional"],
        bias=cfg["bias"],
        scale=scale,
        dtype=dtype,
    )
    b, t, d = cfg["batch"], cfg["steps"], cfg["in_features"]
    x = (scale * rng.standard_normal((b, t, d))).astype(dtype)
    if not cfg["batch_first"]:
        x = np.ascontiguousarray(np.swapaxes(x, 0, 1))
    h0 = None
    if cfg["use_h0"]:
        h0 = rng.uniform(-1, 1, (cfg["num_layers"] * num_dirs, b, hidden)).astype(dtype)
    return params, x, h0, cfg["lengths"]


# jit: one compilation per drawn configuration instead of one per primitive (eager mode).
_gru = jax.jit(gru_jax.gru, static_argnames=("batch_first", "reset_after", "unroll", "remat"))


def run_gru(cfg, params, x, h0, lengths):
    return _gru(
        params,
        x,
        h0,
        lengths=lengths,
        batch_first=cfg["batch_first"],
        reset_after=cfg["reset_after"],
        unroll=cfg["unroll"],
        remat=cfg["remat"],
    )


def batch_major(cfg, a):
    return a if cfg["batch_first"] else np.swapaxes(a, 0, 1)


# --------------------------------------------------------------------------------------------
# The reference itself is checked against torch, so that the oracle is not circular.
# --------------------------------------------------------------------------------------------


def test_reference_matches_torch():
    """The reference reproduces torch's packed bidirectional 2-layer GRU in float64."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    h0 = torch.randn(4, 3, 4, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4])
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        x, lengths, batch_first=True, enforce_sorted=False
    )
    out_p, h_n = net(packed, h0)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out_p, batch_first=True, total_length=6)
    # torch stores W (3H, D); the tree stores W.T, directions stacked (done here by hand)
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    names = {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh"}
    params = {
        f"layer_{layer}": {
            ours: np.stack([sd[f"{theirs}_l{layer}{sfx}"].T for sfx in ("", "_reverse")])
            for ours, theirs in names.items()
        }
        for layer in range(2)
    }
    ref_out, ref_h = reference_gru(params, x.numpy(), h0.numpy(), lengths=lengths.numpy())
    np.testing.assert_allclose(ref_out, out.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref_h, h_n.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_reference_reset_before_by_hand():
    """reset_after=False on a 1-unit cell, computed by hand from Cho et al.'s equations."""
    w = {
        "w_ih": np.array([[[0.5, -0.3, 0.8]]]),
        "w_hh": np.array([[[0.2, 0.4, -0.6]]]),
        "b_ih": np.array([[0.1, 0.2, 0.3]]),
        "b_hh": np.array([[-0.1, 0.05, 0.2]]),
    }
    x, h = 1.5, 0.7
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    r = sig(0.5 * x + 0.1 + 0.2 * h - 0.1)
    z = sig(-0.3 * x + 0.2 + 0.4 * h + 0.05)
    n = np.tanh(0.8 * x + 0.3 + (r * h) * -0.6 + 0.2)
    want = (1 - z) * n + z * h
    out, h_n = reference_gru(
        {"layer_0": w}, np.array([[[x]]]), np.array([[[h]]]), reset_after=False
    )
    np.testing.assert_allclose(out[0, 0, 0], want, rtol=1e-15)
    np.testing.assert_allclose(h_n[0, 0, 0], want, rtol=1e-15)


# --------------------------------------------------------------------------------------------
# gru_jax.gru == reference
# --------------------------------------------------------------------------------------------


@_settings(10)
@given(cfg=configs())
def test_matches_reference_float32(cfg):
    params, x, h0, lengths = make_inputs(cfg)
    out, h_n = run_gru(cfg, params, x, h0, lengths)
    assert out.dtype == jnp.float32 and h_n.dtype == jnp.float32
    ref_out, ref_h = reference_gru(
        params,
        x,
        h0,
        lengths=lengths,
        batch_first=cfg["batch_first"],
        reset_after=cfg["reset_after"],
    )
    tol = TOL[np.float32]
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(h_n), ref_h, rtol=tol, atol=tol)
    if lengths is not None:  # padded outputs are exactly zero, not merely close
        t = np.arange(cfg["steps"])[None, :]
        assert np.all(batch_major(cfg, np.asarray(out))[t >= lengths[:, None]] == 0)


@_settings(8)
@given(cfg=configs())
def test_matches_reference_float64(cfg):
    with jax.enable_x64(True):
        params, x, h0, lengths = make_inputs(cfg, np.float64)
        out, h_n = run_gru(cfg, params, x, h0, lengths)
        assert out.dtype == jnp.float64 and h_n.dtype == jnp.float64
        ref_out, ref_h = reference_gru(
            params,
            x,
            h0,
            lengths=lengths,
            batch_first=cfg["batch_first"],
            reset_after=cfg["reset_after"],
        )
        tol = TOL[np.float64]
        np.testing.assert_allclose(np.asarray(out), ref_out, rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(h_n), ref_h, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------
# A batch is the sequences run alone
# --------------------------------------------------------------------------------------------


@_settings(4)
@given(cfg=configs(with_lengths=True))
def test_batch_equals_each_sequence_alone(cfg):
    """Sequence ``b`` of a padded batch == ``x[b, :lengths[b]]`` run alone, unpadded.

    Equal to float32 re-association (``atol = rtol = 1e-6``): the batched and the single
    run may block their matmuls differently.
    """
    params, x, h0, lengths = make_inputs(cfg)
    out, h_n = run_gru(cfg, params, x, h0, lengths)
    out_bm = batch_major(cfg, np.asarray(out))
    xb = batch_major(cfg, x)
    for b, n in enumerate(lengths.tolist()):
        h0_b = None if h0 is None else h0[:, b]
        if n == 0:  # nothing runs: the state is h0 and the output is all padding
            want_h = np.zeros_like(h_n[:, b]) if h0 is None else h0_b
            np.testing.assert_array_equal(h_n[:, b], want_h)
            np.testing.assert_array_equal(out_bm[b], 0.0)
            continue
        # unbatched call: (n, D) input, (L*K, H) state
        alone_out, alone_h = _gru(
            params,
            xb[b, :n],
            h0_b,
            batch_first=True,
            reset_after=cfg["reset_after"],
            unroll=cfg["unroll"],
            remat=cfg["remat"],
        )
        np.testing.assert_allclose(out_bm[b, :n], alone_out, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out_bm[b, n:], 0.0)
        np.testing.assert_allclose(h_n[:, b], alone_h, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Padding is never read
# --------------------------------------------------------------------------------------------

NON_FINITE = [np.nan, np.inf, -np.inf]
FINITE_JUNK = [1e30, -1e30, 123.0]


def with_padding(cfg, x, lengths, fill):
    """``x`` with every padded position (``t >= lengths[b]``) set to ``fill``.

    ``fill``: a float, or ``"random"`` for large random values.
    """
    xb = batch_major(cfg, x).copy()
    pad = np.arange(cfg["steps"])[None, :] >= lengths[:, None]
    if isinstance(fill, str):
        rng = np.random.default_rng(cfg["seed"] + 1)
        xb[pad] = (1e4 * rng.standard_normal(xb[pad].shape)).astype(x.dtype)
    else:
        xb[pad] = fill
    return np.ascontiguousarray(batch_major(cfg, xb)), pad


@_settings(6)
@given(
    cfg=configs(with_lengths=True),
    fill=st.sampled_from([*NON_FINITE, *FINITE_JUNK, "random"]),
)
def test_padding_never_changes_outputs(cfg, fill):
    """Any padding values, NaN and inf included: bit-identical output and h_n."""
    params, x, h0, lengths = make_inputs(cfg)
    clean, _ = with_padding(cfg, x, lengths, 0.0)
    dirty, _ = with_padding(cfg, x, lengths, fill)
    out_c, h_c = run_gru(cfg, params, clean, h0, lengths)
    out_d, h_d = run_gru(cfg, params, dirty, h0, lengths)
    np.testing.assert_array_equal(out_d, out_c)
    np.testing.assert_array_equal(h_d, h_c)


@functools.partial(jax.jit, static_argnames=("batch_first", "reset_after", "unroll", "remat"))
def _loss_and_grads(params, x, h0, lengths, w_out, w_h, **static):
    def loss(params, x, h0):
        out, h_n = gru_jax.gru(params, x, h0, lengths=lengths, **static)
        return jnp.sum(out * w_out) + jnp.sum(h_n * w_h)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(params, x, h0)


def loss_and_grads(cfg, params, x, h0, lengths):
    """Gradients of a loss touching every output and final state, w.r.t. params, x, h0."""
    rng = np.random.default_rng(cfg["seed"] + 2)
    num_dirs = 2 if cfg["bidirectional"] else 1
    out_shape = (*x.shape[:-1], num_dirs * cfg["hidden"])
    w_out = rng.standard_normal(out_shape).astype(np.float32)
    w_h = rng.standard_normal((cfg["num_layers"] * num_dirs, cfg["batch"], cfg["hidden"]))
    w_h = w_h.astype(np.float32)
    h0 = np.zeros_like(w_h) if h0 is None else h0
    static = {k: cfg[k] for k in ("batch_first", "reset_after", "unroll", "remat")}
    return _loss_and_grads(params, x, h0, lengths, w_out, w_h, **static)


@_settings(4)
@given(cfg=configs(with_lengths=True), fill=st.sampled_from([*FINITE_JUNK, "random"]))
def test_padding_never_changes_gradients(cfg, fill):
    """Finite junk in the padding: bit-identical gradients, and zero gradient for the padding.

    Non-finite padding is covered by :func:`test_nonfinite_padding_gradients`.
    """
    params, x, h0, lengths = make_inputs(cfg)
    clean, pad = with_padding(cfg, x, lengths, 0.0)
    dirty, _ = with_padding(cfg, x, lengths, fill)
    loss_c, (gp_c, gx_c, gh_c) = loss_and_grads(cfg, params, clean, h0, lengths)
    loss_d, (gp_d, gx_d, gh_d) = loss_and_grads(cfg, params, dirty, h0, lengths)
    assert loss_d == loss_c
    jax.tree.map(np.testing.assert_array_equal, gp_d, gp_c)
    np.testing.assert_array_equal(gx_d, gx_c)
    np.testing.assert_array_equal(gh_d, gh_c)
    np.testing.assert_array_equal(batch_major(cfg, np.asarray(gx_d))[pad], 0.0)


@pytest.mark.parametrize("fill", NON_FINITE)
def test_nonfinite_padding_gradients(fill):
    cfg = {
        "num_layers": 2,
        "bidirectional": True,
        "bias": True,
        "reset_after": True,
        "batch_first": True,
        "batch": 3,
        "steps": 5,
        "in_features": 3,
        "hidden": 4,
        "use_h0": True,
        "unroll": 1,
        "remat": False,
        "scale": 1.0,
        "seed": 7,
        "lengths": np.array([5, 2, 0], np.int32),
    }
    params, x, h0, lengths = make_inputs(cfg)
    clean, _ = with_padding(cfg, x, lengths, 0.0)
    dirty, _ = with_padding(cfg, x, lengths, fill)
    _, (gp_c, gx_c, gh_c) = loss_and_grads(cfg, params, clean, h0, lengths)
    _, (gp_d, gx_d, gh_d) = loss_and_grads(cfg, params, dirty, h0, lengths)
    jax.tree.map(np.testing.assert_array_equal, gp_d, gp_c)
    np.testing.assert_array_equal(gx_d, gx_c)
    np.testing.assert_array_equal(gh_d, gh_c)
