"""The fused Pallas strategy: one kernel runs all T steps with ``w_hh`` resident on chip.

:func:`layer` is the ``impl="pallas"`` strategy (the contract of :mod:`gru_jax._loops`).
Per layer and pass it launches one kernel whose grid covers the directions (and blocks of
rows; on a TPU also blocks of time); each program loads its direction's ``w_hh`` once and
runs the time loop with the state in the accumulation dtype (float32, or float64):

* the input projections of every step (``x @ w_ih`` plus the biases not scaled by the reset
  gate) are one big matmul per direction outside the kernel, as on the XLA path;
* the kernel's step wires the gates with :func:`gru_jax._cell.wire` and computes the cell
  with :func:`gru_jax._cell.cell`, so the equations stay written once;
* steps at or past a sequence's length keep the state (packed semantics), so the state
  after the last step is the one after the last valid step.

Which kernel runs is decided where the program is lowered (:mod:`gru_jax._pallas_platforms`):
Triton on a GPU, Mosaic on a TPU, the interpreter on the CPU.

The derivative is a ``jax.custom_vjp`` (:func:`recurrence`): a second kernel runs the state
cotangent backward in time with ``w_hh`` resident, and the weight gradient is one matmul
per direction outside it (:mod:`gru_jax._pallas_bwd`). Forward-mode AD (``jax.jvp``,
``jax.jacfwd``) is not supported: JAX raises ``TypeError`` ("can't apply forward-mode
autodiff (jvp) to a custom_vjp function"); ``impl="xla"`` supports it. ``remat`` has no
effect here: the backward kernel reads the saved states and projections.

This module imports jax and :mod:`gru_jax._cell`, :mod:`gru_jax._loops`,
:mod:`gru_jax._pallas_kernel`, :mod:`gru_jax._pallas_bwd`, :mod:`gru_jax._pallas_platforms`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gru_jax import _cell, _loops, _pallas_bwd
from gru_jax._pallas_kernel import Spec
from gru_jax._pallas_platforms import launch


def _shapes(*arrays):
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def recurrence(spec: Spec, xp, w, b_hn, h0, lengths):
    """The recurrence of every direction, differentiable in reverse mode.

    Args:
      spec: the kernels' configuration.
      xp: ``(K, T, B, 3H)`` input projections in scan order, in the accumulation dtype.
      w: ``(K, H, 3H)`` ``w_hh`` in the compute dtype.
      b_hn: ``(K, 1, H)`` in the accumulation dtype (zeros without a bias).
      h0: ``(K, B, H)`` in the accumulation dtype.
      lengths: ``int32[B, 1]`` in ``[0, T]``.

    Returns:
      ``(states, h_last)``: ``(K, T, B, H)`` and ``(K, B, H)``.
    """
    return _forward(spec, xp, w, b_hn, h0, lengths)[0]


def _forward(spec: Spec, xp, w, b_hn, h0, lengths):
    states = jax.ShapeDtypeStruct((*xp.shape[:3], h0.shape[-1]), h0.dtype)
    out = launch("forward", spec, (states, *_shapes(h0)), xp, w, b_hn, h0, lengths)
    return tuple(out), (xp, w, b_hn, h0, lengths, out[0])


def _backward(spec: Spec, residuals, cotangents):
    xp, w, b_hn, h0, lengths, states = residuals
    d_states, d_last = cotangents
    hprev = jnp.concatenate([h0[:, None], states[:, :-1]], axis=1)  # (K, T, B, H)
    dxp, extra, dh0 = launch(
        "backward", spec, _shapes(xp, hprev, h0),
        xp, hprev, d_states, w, b_hn, d_last, lengths,
    )  # fmt: skip
    dw, db = _pallas_bwd.weight_grads(spec, hprev, dxp, extra, w, b_hn)
    return dxp, dw, db, dh0, None


recurrence.defvjp(_forward, _backward)


def layer(lp, xs, h0, lengths, opts: _loops.Options):
    """One layer, every direction, as one Pallas kernel per pass (forward and backward): a
    :class:`gru_jax._loops.Strategy` (arguments and results as documented there), for
    static shapes; ``opts.unroll`` is the in-kernel loop's (``None``: the platform's)."""
    acc, cd = h0.dtype, jnp.dtype(opts.compute_dtype)
    w_ih, w_hh = lp["w_ih"], lp["w_hh"]
    num_dirs, hidden = w_hh.shape[0], w_hh.shape[1]
    xs = _loops.time_major(xs, opts.time_axis)
    steps, batch = xs.shape[0], xs.shape[1]
    if steps == 0:  # no step to run: an empty output, and each last state is h0
        ys = jnp.zeros((0, batch, num_dirs * hidden), acc)
        return _loops.time_major(ys, opts.time_axis), h0
    bias_x, b_hn = _cell.split_bias(lp.get("b_ih"), lp.get("b_hh"), hidden, opts.reset_after)
    # The input projection of every step is one matmul outside the kernel.
    xp = jnp.stack(_loops.project_fused(xs, w_ih, bias_x, lengths, cd, acc))  # (K, T, B, 3H)
    b = jnp.zeros((num_dirs, 1, hidden), acc) if b_hn is None else b_hn.astype(acc)[:, None]
    lens = jnp.full((batch,), steps, jnp.int32) if lengths is None else lengths
    spec = Spec(bool(opts.reset_after), opts.unroll, cd, opts.interpret_kernel)
    states, h_last = recurrence(spec, xp, w_hh.astype(cd), b, h0, lens.astype(jnp.int32)[:, None])
    ys = _loops.layer_output(tuple(states), lengths, 0)
    return _loops.time_major(ys, opts.time_axis), h_last
