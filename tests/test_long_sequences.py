"""T = 10,000: forward and backward with ``remat=True``, finite, correct, and bounded memory.

Memory bound. "Saved states" is ``S = T * B * H * L * K * 4`` bytes: one float32 state per
step, batch row, unit, layer and direction, the least a backward pass through the recurrence
can keep. The backward pass legitimately holds a small constant number of arrays of that size
per layer and direction: the states and the previous states, the three gates' input
projections, up to five gate coefficients or residuals, the tangent/cotangent sequence and the
layer output with its cotangent. So we require

    temp_size (XLA's scratch for the whole jitted value_and_grad) <= 20 * S + weights

and with ``remat=True`` and ``reset_after=True`` (the backward runs chunk by chunk, each chunk
rerunning its steps from the state before it, so only one state per chunk is kept)
``<= 4 * S + weights`` (measured: 2.6 S with remat, 3.6 S when the remat kept every state,
13.9 S without (13.6 S before h_n came from the loops' final carry); ~11.1 S with remat /
~16.9 S without for ``reset_after=False``; the ratio does not depend on T). The test uses
``B = 2``, ``H = 16`` so that an implementation keeping anything weight-sized per step
(``T * H * 3H`` floats, e.g. per-step weight-gradient contributions) would need 24 S per layer
and direction and fail, as would anything superlinear in T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import random_params, reference_gru

import gru_jax

T, B, D, H, L, K = 10_000, 2, 4, 16, 2, 2
SAVED = T * B * H * L * K * 4
FACTOR = 20
REMAT_FACTOR = 4


def problem():
    rng = np.random.default_rng(0)
    params = random_params(rng, D, H, num_layers=L, bidirectional=K == 2)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    lengths = np.array([T, T // 3], np.int32)
    return params, x, lengths


def value_and_grad(reset_after: bool, remat: bool, lengths):
    def loss(params, x):
        out, h_n = gru_jax.gru(params, x, lengths=lengths, remat=remat, reset_after=reset_after)
        return jnp.sum(out**2) + jnp.sum(h_n), (out, h_n)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def temp_bytes(compiled):
    analysis = compiled.memory_analysis()
    if analysis is None:  # pragma: no cover - backends without memory analysis
        pytest.skip("this backend reports no memory analysis")
    return analysis.temp_size_in_bytes


def test_t10000_forward_backward_remat():
    params, x, lengths = problem()
    compiled = value_and_grad(True, True, lengths).lower(params, x).compile()
    weights = sum(a.nbytes for a in jax.tree.leaves(params))
    temp = temp_bytes(compiled)
    assert temp <= REMAT_FACTOR * SAVED + weights, (temp / SAVED, "x saved states")

    (value, (out, h_n)), (g_params, g_x) = compiled(params, x)
    for a in (value, out, h_n, g_x, *jax.tree.leaves(g_params)):
        assert np.all(np.isfinite(a))

    # Numbers, not only finiteness: float32 over 10,000 steps still matches the float64
    # reference (errors do not accumulate: each step forgets part of the past), at a few
    # positions and for h_n. atol 1e-4: ~1000 float32 ulps of O(1) values.
    ref_out, ref_h = reference_gru(params, x, lengths=lengths)
    for t in (0, 1, T // 3 - 1, T // 2, T - 1):
        np.testing.assert_allclose(out[:, t], ref_out[:, t], atol=1e-4)
    np.testing.assert_allclose(h_n, ref_h, atol=1e-4)
    np.testing.assert_array_equal(out[1, T // 3 :], 0.0)

    # The gradient reaches the first step of the 10,000 (nonzero, finite) and is exactly zero
    # on the padding of the short sequence.
    g_x = np.asarray(g_x)
    assert np.all(np.abs(g_x[:, 0]).sum(-1) > 0)
    np.testing.assert_array_equal(g_x[1, T // 3 :], 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("reset_after", [True, False])
def test_remat_never_costs_memory(reset_after):
    """``remat=True`` needs no more scratch memory than ``remat=False`` (both within bound)."""
    params, x, lengths = problem()
    remat, plain = (
        temp_bytes(value_and_grad(reset_after, r, lengths).lower(params, x).compile())
        for r in (True, False)
    )
    weights = sum(a.nbytes for a in jax.tree.leaves(params))
    assert remat <= plain <= FACTOR * SAVED + weights, (remat / SAVED, plain / SAVED)
