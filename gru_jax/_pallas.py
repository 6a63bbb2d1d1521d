"""A fused Pallas GRU layer: one kernel runs all T steps with ``w_hh`` resident on chip.

(Being written: see tests/test_pallas.py.)
"""

from __future__ import annotations


def layer(lp, xs, h0, lengths, *, time_axis, reset_after, unroll, compute_dtype, interpret):
    """One layer, every direction, as one Pallas kernel per pass (forward and backward).

    Contract: as the strategies of :mod:`gru_jax._loops` behind
    :func:`gru_jax._dispatch.run_layer`.

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
    raise NotImplementedError("impl='pallas' is not implemented yet")
