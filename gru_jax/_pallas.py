"""A fused Pallas GRU layer: one kernel runs all T steps with ``w_hh`` resident on chip.

:func:`layer` is the ``impl="pallas"`` strategy behind :func:`gru_jax._dispatch.run_layer`.
Per layer and pass it launches one ``pallas_call`` whose grid covers the directions (and
blocks of rows); each program loads its direction's ``w_hh`` once and runs the whole time
loop with the state in the accumulation dtype (float32, or float64):

* the input projections of every step (``x @ w_ih`` plus the biases not scaled by the reset
  gate) are one big matmul per direction outside the kernel, as on the XLA path;
* the kernel computes the cell by calling :func:`gru_jax._cell.cell` (or
  :func:`gru_jax._cell.reset_after_cell`), so the equations stay written once;
* steps at or past a sequence's length keep the state (packed semantics), so the state
  after the last step is the one after the last valid step.

The derivative is a ``jax.custom_vjp`` (:mod:`gru_jax._pallas_bwd`): a second kernel runs
the state cotangent backward in time with ``w_hh`` resident, and the weight gradient is one
matmul per direction outside it. Forward-mode AD (``jax.jvp``, ``jax.jacfwd``) of
``impl="pallas"`` is not supported: JAX raises ``TypeError`` ("can't apply forward-mode
autodiff (jvp) to a custom_vjp function"); use ``impl="xla"`` for it.

Shapes inside the kernels are padded: ``H`` to ``Hp`` and the batch to ``Bp``, powers of two
of at least 16 (the GPU lowering's block rule for matmuls). Padded hidden units stay 0
(their weights and initial state are 0), padded rows have length 0; both are sliced off.

``remat`` has no effect here: the backward kernel reads the saved states and projections.

The kernels are in :mod:`gru_jax._pallas_kernel` (forward) and :mod:`gru_jax._pallas_bwd`
(backward); this module holds the layer around them and wires the derivative.

This module imports jax and :mod:`gru_jax._cell`, :mod:`gru_jax._loops`,
:mod:`gru_jax._pallas_kernel`, :mod:`gru_jax._pallas_bwd`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gru_jax import _cell, _loops, _pallas_bwd
from gru_jax._pallas_kernel import ROW_BLOCK, Spec, padded, run_forward


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def recurrence(spec: Spec, xp, w, b_hn, h0, lengths):
    """The padded recurrence of every direction, differentiable in reverse mode.

    Args:
      spec: the launch configuration.
      xp: ``(K, T, Bp, 3Hp)`` input projections in scan order, in the accumulation dtype.
      w: ``(K, Hp, 3Hp)`` ``w_hh`` in the compute dtype.
      b_hn: ``(K, 1, Hp)`` in the accumulation dtype (zeros without a bias).
      h0: ``(K, Bp, Hp)`` in the accumulation dtype.
      lengths: ``int32[Bp, 1]`` in ``[0, T]``.

    Returns:
      ``(states, h_last)``: ``(K, T, Bp, Hp)`` and ``(K, Bp, Hp)``.
    """
    return run_forward(spec, xp, w, b_hn, h0, lengths)


recurrence.defvjp(_pallas_bwd.forward, _pallas_bwd.backward)


def layer(lp, xs, h0, lengths, *, time_axis, reset_after, unroll, compute_dtype, interpret):
    """One layer, every direction, as one Pallas kernel per pass (forward and backward).

    Contract: as the strategies of :mod:`gru_jax._loops` behind
    :func:`gru_jax._dispatch.run_layer`. Reverse mode only: forward-mode AD raises
    ``TypeError`` (``custom_vjp``); ``impl="xla"`` supports it.

    Args:
      lp: the layer's params, ``w_ih (K, D, 3H)``, ``w_hh (K, H, 3H)``, biases ``(K, 3H)``.
      xs: ``(T, B, D)`` (``(B, T, D)`` for ``time_axis=1``), zero at padded steps.
      h0: ``(K, B, H)`` in the accumulation dtype (float32, or float64).
      lengths: ``int32[B]`` in ``[0, T]`` or ``None``.
      time_axis: 0 or 1, the time axis of ``xs`` and of the returned states.
      reset_after: the cell variant.
      unroll: unroll factor of the in-kernel time loop.
      compute_dtype: dtype of the matmul inputs.
      interpret: run the kernel in Pallas's interpret mode (the CPU).

    Returns:
      ``(states, h_last)``: per direction, the ``(T, B, H)`` states in scan order (the
      reverse direction's valid-reversed, as :func:`gru_jax._loops.source` reads its input;
      padded steps unspecified), in ``xs``'s layout, and ``h_last`` ``(K, B, H)``, each
      direction's state after its last valid step, all in the accumulation dtype.
    """
    acc = h0.dtype
    cd = jnp.dtype(compute_dtype)
    w_ih, w_hh = lp["w_ih"], lp["w_hh"]
    num_dirs, hidden = w_hh.shape[0], w_hh.shape[1]
    xs = _loops.time_major(xs, time_axis)
    steps, batch = xs.shape[0], xs.shape[1]
    if steps == 0:  # no step to run: no states, and each last state is h0
        empty = jnp.zeros((0, batch, hidden), acc)
        return tuple(_loops.time_major(empty, time_axis) for _ in range(num_dirs)), h0
    bias_x, b_hn = _cell.split_bias(lp.get("b_ih"), lp.get("b_hh"), hidden, reset_after)
    hp, bp = padded(hidden), padded(batch)
    rows = min(bp, ROW_BLOCK)
    spec = Spec(bool(reset_after), int(unroll), cd, bool(interpret), rows)

    def pad_gates(a, lead_widths):
        # (..., 3H) -> (..., 3Hp): each gate's block padded with zeros.
        a = jnp.pad(a.reshape((*a.shape[:-1], 3, hidden)), [*lead_widths, (0, 0), (0, hp - hidden)])
        return a.reshape((*a.shape[:-2], 3 * hp))

    # The input projection of every step is one matmul outside the kernel.
    xps = _loops.project_fused(xs, w_ih, bias_x, lengths, cd, acc)
    xp = pad_gates(jnp.stack(xps), [(0, 0), (0, 0), (0, bp - batch)])  # (K, T, Bp, 3Hp)
    w = pad_gates(w_hh.astype(cd), [(0, 0), (0, hp - hidden)])  # (K, Hp, 3Hp)
    if b_hn is None:
        b = jnp.zeros((num_dirs, 1, hp), acc)
    else:
        b = jnp.pad(b_hn.astype(acc), [(0, 0), (0, hp - hidden)])[:, None]
    h = jnp.pad(h0, [(0, 0), (0, bp - batch), (0, hp - hidden)])
    lens = jnp.full((batch,), steps, jnp.int32) if lengths is None else lengths
    lens = jnp.pad(lens.astype(jnp.int32), (0, bp - batch))[:, None]
    states, h_last = recurrence(spec, xp, w, b, h, lens)
    states = states[:, :, :batch, :hidden]
    out = tuple(_loops.time_major(states[k], time_axis) for k in range(num_dirs))
    return out, h_last[:, :batch, :hidden]
