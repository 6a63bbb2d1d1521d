"""One layer over time: the one entry point to the time loops, and the rule that picks one.

:func:`run_layer` is the only caller of the loop strategies of :mod:`gru_jax._loops` (and of
the derivative that wraps them). The rule, in order:

0. Symbolic shapes (``jax.export`` with a symbolic batch size or time): the rule below with
   ``unroll=1`` and without inference's phases, whose unrolled trip counts and row
   prefixes need concrete sizes; the program is then the same for every shape.
1. ``impl="pallas"``: :func:`gru_jax._pallas.layer`, one fused Pallas kernel per layer for
   the whole sequence, with its own custom VJP (either ``reset_after``); chosen only when
   asked for (see :func:`resolve_impl`).
2. ``reset_after=False`` (Cho et al.): :func:`gru_jax._loops.scan_layer`, a plain scan that
   JAX differentiates itself. The variant is rare and its matmul after the reset gate leaves
   no room for the reset-after tricks.
3. ``reset_after=True``: :func:`gru_jax._derivative.layer`, whose primal (inference) is
   :func:`gru_jax._loops.inplace_forward`, phased over rows sorted by length when there are
   ``lengths`` and ``unroll=1``, and whose custom JVP runs
   :func:`gru_jax._loops.scan_with_partials` (or, with ``remat``,
   :func:`gru_jax._remat.chunked_forward` and a rerun per chunk).

A new strategy is one more branch here, chosen by a documented rule, and one more function
beside the others.

This module imports jax and :mod:`gru_jax._cell`, :mod:`gru_jax._loops`,
:mod:`gru_jax._derivative`, :mod:`gru_jax._pallas`, :mod:`gru_jax._masking`.
"""

from __future__ import annotations

import jax.numpy as jnp

from gru_jax import _cell, _derivative, _loops, _masking, _pallas


def run_layer(lp, xs, h0, *, lengths, time_axis: int, reset_after: bool, unroll: int,
              remat: bool, compute_dtype, impl: str = "xla"):  # fmt: skip
    """Runs one layer, all directions at once.

    Args:
      lp: the layer's params, ``w_ih (K, D, 3H)``, ``w_hh (K, H, 3H)``, biases ``(K, 3H)``.
      xs: ``(T, B, D)`` layer input (``(B, T, D)`` for ``time_axis=1``), zero at padded
        steps.
      h0: ``(K, B, H)`` initial states in the accumulation dtype.
      lengths: ``int32[B]`` in ``[0, T]``, or ``None`` when every sequence is full length:
        the only masking input.
      time_axis: 0 or 1, the time axis of ``xs`` and of the output.
      reset_after, unroll, remat, compute_dtype: as :func:`gru_jax.gru` (``unroll`` an int).
      impl: ``"xla"`` or ``"pallas"`` (resolved from ``"auto"`` by :func:`resolve_impl`).

    Returns:
      ``(ys, h_n)``: ``ys`` ``(T, B, K*H)`` (``(B, T, K*H)``) in the accumulation dtype,
      zero at padded steps; ``h_n`` ``(K, B, H)``, each direction's state after its last
      valid step.
    """
    static = all(isinstance(d, int) for d in xs.shape)
    if not static:
        # Symbolic shapes (jax.export): a scan unrolled by k needs T // k at trace time.
        unroll = 1
    if impl == "pallas":
        states, h_n = _pallas.layer(
            lp, xs, h0, lengths, time_axis=time_axis, reset_after=reset_after, unroll=unroll,
            compute_dtype=compute_dtype, interpret=_loops.platform() == "cpu",
        )  # fmt: skip
        return _outputs(states, lengths, time_axis), h_n
    if not reset_after:
        states, h_n = _loops.scan_layer(
            lp, _loops.time_major(xs, time_axis), h0, lengths, reset_after=reset_after,
            unroll=unroll, remat=remat, compute_dtype=compute_dtype,
        )  # fmt: skip
        return _loops.time_major(_outputs(states, lengths, 0), time_axis), h_n
    w_ih, w_hh = lp["w_ih"], lp["w_hh"]
    bias_x, b_hn = _cell.split_bias(lp.get("b_ih"), lp.get("b_hh"), w_hh.shape[1], reset_after)
    opts = _loops.Options(
        int(unroll), bool(remat), jnp.dtype(compute_dtype), time_axis, phases=static
    )
    # h_n is the state after scan step length - 1 in both directions (h0 for length 0).
    states, h_last = _derivative.layer(opts, xs, w_ih, bias_x, w_hh, b_hn, h0, lengths)
    return _outputs(states, lengths, time_axis), jnp.stack(h_last)


IMPLS = ("auto", "xla", "pallas")


def resolve_impl(impl: str) -> str:
    """The loop implementation that ``impl`` stands for: ``"xla"`` or ``"pallas"``.

    ``"auto"`` is ``"xla"`` everywhere: no measurement recorded in the performance docs
    shows the Pallas kernel faster yet (it has not been timed on a GPU). ``"pallas"`` on
    the CPU runs the kernel in Pallas's interpret mode (for tests, not for speed).

    Raises:
      ValueError: if ``impl`` is not one of :data:`IMPLS`.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    return "xla" if impl == "auto" else impl


def _outputs(states, lengths, time_axis: int):
    """The layer output from the per-direction states in scan order: the reverse direction
    put back in forward order, both concatenated, padded steps set to exactly 0."""
    y = states[0]
    if len(states) == 2:
        y = jnp.concatenate([y, _masking.reverse_valid(states[1], lengths, time_axis)], axis=-1)
    if lengths is not None:
        mask = _masking.time_mask(lengths, y.shape[time_axis], time_axis)
        y = jnp.where(mask, y, jnp.zeros((), y.dtype))
    return y
