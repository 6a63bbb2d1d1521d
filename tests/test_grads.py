"""Gradients: autodiff vs finite differences in float64, and remat == no remat.

``jax.test_util.check_grads`` compares forward- and reverse-mode derivatives along a random
direction with central finite differences. In float64 with step ``eps = 1e-6`` the truncation
error is ``O(eps**2) ~ 1e-12`` and the rounding error ``~ 1e-16 / eps = 1e-10`` times the
function scale (outputs are O(1) here), so ``atol = rtol = 1e-6`` leaves four orders of
magnitude of headroom while any wrong gradient term (typically O(0.1)) fails.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import random_params
from jax.test_util import check_grads

import gru_jax

TOL = 1e-6
EPS = 1e-6


def make(seed, *, batch, steps, in_features, hidden, num_layers, bidirectional, bias, dtype):
    """NumPy params tree, ``x`` ``(B, T, D)`` and ``h0`` ``(L*K, B, H)`` of ``dtype``."""
    rng = np.random.default_rng(seed)
    params = random_params(
        rng,
        in_features,
        hidden,
        num_layers=num_layers,
        bidirectional=bidirectional,
        bias=bias,
        dtype=dtype,
    )
    x = rng.standard_normal((batch, steps, in_features)).astype(dtype)
    states = num_layers * (2 if bidirectional else 1)
    h0 = (0.5 * rng.standard_normal((states, batch, hidden))).astype(dtype)
    return params, x, h0


# (name, config, lengths, gru kwargs, order). Second order through the time scan costs
# ~15 s of CPU per case, so it runs with --runslow; the cell itself is checked to second order
# in every run (test_check_grads_gru_step_order2).
CASES = [
    pytest.param(
        dict(num_layers=1, bidirectional=False, bias=True),
        [3, 1],
        dict(reset_after=True),
        1,
        id="1layer-bias-reset_after",
    ),
    pytest.param(
        dict(num_layers=2, bidirectional=True, bias=False),
        [3, 0],
        dict(reset_after=False, remat=True, batch_first=False, dropout=0.3, key=None),
        1,
        id="2layer-bidir-nobias-reset_before-remat-timemajor-dropout",
    ),
    pytest.param(
        dict(num_layers=1, bidirectional=True, bias=True),
        [2, 3],
        dict(reset_after=True),
        2,
        id="1layer-bidir-order2",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("config, lengths, kwargs, order", CASES)
def test_check_grads_float64(config, lengths, kwargs, order):
    """Forward and reverse mode against finite differences, w.r.t. params, x and h0.

    Dropout (when configured) uses a fixed key, so its mask is a constant of the function.
    """
    with jax.enable_x64(True):
        params, x, h0 = make(
            0, batch=2, steps=3, in_features=2, hidden=3, dtype=np.float64, **config
        )
        if not kwargs.get("batch_first", True):
            x = np.ascontiguousarray(np.swapaxes(x, 0, 1))
        if "key" in kwargs:
            kwargs = kwargs | {"key": jax.random.key(5)}
        lens = None if lengths is None else np.asarray(lengths, np.int32)

        @jax.jit
        def f(params, x, h0):
            return gru_jax.gru(params, x, h0, lengths=lens, **kwargs)

        out, h_n = f(params, x, h0)
        assert out.dtype == jnp.float64 and h_n.dtype == jnp.float64
        check_grads(
            f, (params, x, h0), order=order, modes=("fwd", "rev"), atol=TOL, rtol=TOL, eps=EPS
        )


@pytest.mark.parametrize(
    "reset_after", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["after", "before"]
)
def test_check_grads_gru_step_order2(reset_after):
    """The single cell up to second order (the reset-before cell: order 1 in the stack test,
    order 2 with --runslow)."""
    with jax.enable_x64(True):
        params, x, h0 = make(
            1,
            batch=2,
            steps=1,
            in_features=3,
            hidden=4,
            num_layers=1,
            bidirectional=False,
            bias=True,
            dtype=np.float64,
        )
        cell = gru_jax.cell_of(params)
        f = jax.jit(functools.partial(gru_jax.gru_step, reset_after=reset_after))
        check_grads(
            f, (cell, h0[0], x[:, 0]), order=2, modes=("fwd", "rev"), atol=TOL, rtol=TOL, eps=EPS
        )


def test_check_grads_detects_a_wrong_gradient():
    """Sanity check of the tolerance: a cell gradient off by 1% is caught."""
    with jax.enable_x64(True):
        params, x, h0 = make(
            2,
            batch=2,
            steps=1,
            in_features=2,
            hidden=3,
            num_layers=1,
            bidirectional=False,
            bias=True,
            dtype=np.float64,
        )
        cell, h = gru_jax.cell_of(params), h0[0]

        def step(x):
            return gru_jax.gru_step(cell, h, x)

        @jax.custom_vjp
        def f(x):
            return step(x)

        def fwd(x):
            return jax.vjp(step, x)

        def bwd(vjp, g):
            (gx,) = vjp(g)
            return (1.01 * gx,)

        f.defvjp(fwd, bwd)
        check_grads(step, (x[:, 0],), order=1, modes=("rev",), atol=TOL, rtol=TOL, eps=EPS)
        with pytest.raises(AssertionError):
            check_grads(f, (x[:, 0],), order=1, modes=("rev",), atol=TOL, rtol=TOL, eps=EPS)


# --------------------------------------------------------------------------------------------
# remat
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps, batch_first",
    [(7, True), (300, True), (300, False)],
    ids=["whole", "chunked-batch-first", "chunked-time-major"],
)
def test_remat_gradients_equal(steps, batch_first, bidirectional=True, reset_after=True):
    """``remat=True`` recomputes the forward in the backward pass: same gradients.

    At T = 7 the tangent pass is one checkpointed piece; at T = 300 (B = 3) it runs in
    three chunks of 100 steps, which read a batch-first input where it lies, and each of
    which reruns its steps from the state before it (a start state one step off fails
    this test). float32; in one piece the recomputation runs the same operations on the
    same values, so equality is asserted to ``rtol = 1e-6`` (XLA may fuse the recomputed
    step differently, which can move the last bit), not merely "close"; in chunks the
    weight gradients are summed chunk by chunk instead of in one matmul over all steps
    (measured: at most 1e-6 of the largest entry, on an entry that cancels to 0.023 among
    entries up to 7).
    """
    num_layers = 1
    params, x, h0 = make(
        3,
        batch=3,
        steps=steps,
        in_features=4,
        hidden=5,
        num_layers=num_layers,
        bidirectional=bidirectional,
        bias=True,
        dtype=np.float32,
    )
    lengths = np.array([steps, steps // 2 + 1, 0], np.int32)
    w = np.random.default_rng(9).standard_normal((3, steps, (2 if bidirectional else 1) * 5))
    w = w.astype(np.float32)
    if not batch_first:
        x, w = np.swapaxes(x, 0, 1), np.swapaxes(w, 0, 1)

    def loss(params, x, h0, remat):
        out, h_n = gru_jax.gru(
            params, x, h0, lengths=lengths, remat=remat, reset_after=reset_after,
            batch_first=batch_first,
        )  # fmt: skip
        return jnp.sum(out * w) + jnp.sum(jnp.sin(h_n))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    v0, g0 = grad(params, x, h0, False)
    v1, g1 = grad(params, x, h0, True)
    # In chunks the remat forward is another loop (it projects chunk by chunk), whose states
    # may differ from the plain loop's in the last bit; the loss sums 9,000 products of them
    # (measured: 1.3e-6 relative with jax 0.10.0).
    np.testing.assert_allclose(v1, v0, rtol=1e-6 if steps == 7 else 1e-5)
    flat0, flat1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    assert len(flat0) == len(flat1) == num_layers * 4 + 2
    for a, b in zip(flat1, flat0, strict=True):
        assert np.all(np.isfinite(a)) and np.any(a != 0)
        if steps == 7:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


def test_linen_remat_gradients_equal():
    """The linen module's ``remat`` attribute reaches the core: same gradients as without.

    (The core's ``remat`` on the other variants is checked against finite differences in
    ``test_check_grads_float64``.)
    """
    params, x, _ = make(
        4,
        batch=2,
        steps=6,
        in_features=3,
        hidden=4,
        num_layers=1,
        bidirectional=False,
        bias=True,
        dtype=np.float32,
    )
    variables = {"params": params}  # the linen module's tree is the core's tree
    lengths = np.array([6, 3], np.int32)
    grads = []
    for remat in (False, True):
        model = gru_jax.GRU(hidden_size=4, remat=remat)

        def loss(variables, model=model):
            out, h_n = model.apply(variables, x, lengths=lengths)
            return jnp.sum(out**2) + jnp.sum(h_n)

        grads.append(jax.jit(jax.grad(loss))(variables))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), grads[1], grads[0]
    )
