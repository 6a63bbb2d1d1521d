"""The forward kernel of the fused Pallas GRU layer, and what both kernels share.

:func:`run_forward` launches :func:`forward_kernel` over the grid ``(K, Bp // rows)``: each
program loads its direction's ``w_hh`` once and runs every step with the state in the
accumulation dtype, calling :func:`gru_jax._cell.cell` (or
:func:`gru_jax._cell.reset_after_cell`) for the equations. The pieces that the backward
kernel (:mod:`gru_jax._pallas_bwd`) shares live here too: the launch configuration
(:class:`Spec`), block specs, padding, the per-step pre-activations and the unrolled loop.
See :mod:`gru_jax._pallas` for the layer around them.

This module imports jax and :mod:`gru_jax._cell`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from gru_jax import _cell

# Rows per program: the batch is split into blocks of at most this many rows, each a
# program of its own, so that a large batch spreads over the chip.
ROW_BLOCK = 64
# The smallest block dimension: the GPU lowering needs powers of two of at least 16 for
# the operands of a matmul.
MIN_BLOCK = 16
# A guess, unmeasured: the register budget per thread for the resident weight (128 of the
# 255 32-bit registers a thread may have), leaving room for the state and the gates.
WEIGHT_BYTES_PER_THREAD = 512


class Spec(NamedTuple):
    """The static configuration of one kernel launch (hashable: a ``custom_vjp`` nondiff
    argument)."""

    reset_after: bool
    unroll: int
    compute_dtype: Any
    interpret: bool
    rows: int  # the row block, dividing Bp


def compiler_params(w):
    """The GPU lowering: Triton (the Mosaic GPU lowering's copy rules reject small blocks),
    with enough warps that the resident ``w`` (one direction's ``(Hp, 3Hp)`` block) takes
    at most :data:`WEIGHT_BYTES_PER_THREAD` of each thread's registers, 4 to 16 warps."""
    w_bytes = w.shape[-2] * w.shape[-1] * jnp.dtype(w.dtype).itemsize
    warps = padded(-(-w_bytes // (32 * WEIGHT_BYTES_PER_THREAD)), 4)
    return pltriton.CompilerParams(num_warps=min(warps, 16), num_stages=1)


def padded(n: int, least: int = MIN_BLOCK) -> int:
    """``n`` rounded up to a power of two, at least ``least``."""
    return max(least, 1 << max(0, int(n) - 1).bit_length())


def gate(ref, g: int, hidden: int, t=None):
    """Gate ``g``'s ``hidden`` columns of a ``(..., 3Hp)`` ref (at step ``t`` if given)."""
    cols = pl.ds(g * hidden, hidden)
    return ref[:, cols] if t is None else ref[t, :, cols]


def dot(a, w, acc_dtype):
    """``a @ w`` with ``a`` cast to ``w``'s (the compute) dtype, accumulated in ``acc_dtype``."""
    return jnp.dot(a.astype(w.dtype), w, preferred_element_type=acc_dtype)


def step_pieces(spec: Spec, xp, h, ws, b_hn):
    """The arguments of the cell at one step, from the projections and the state.

    Args:
      spec: the launch configuration.
      xp: the three ``(rows, Hp)`` input projections of the step.
      h: the previous state ``(rows, Hp)``.
      ws: the three ``(Hp, Hp)`` gate blocks of ``w_hh`` in the compute dtype.
      b_hn: ``(1, Hp)``, the bias scaled by the reset gate (zeros without one).

    Returns:
      ``(a_r, a_z, x_n, hn)``: the pre-activations of the gates and, for the reset-after
      cell, ``hn = h W_hn + b_hn`` (``None`` for the other variant).
    """
    acc = h.dtype
    a_r = xp[0] + dot(h, ws[0], acc)
    a_z = xp[1] + dot(h, ws[1], acc)
    hn = dot(h, ws[2], acc) + b_hn if spec.reset_after else None
    return a_r, a_z, xp[2], hn


def new_state(spec: Spec, a_r, a_z, x_n, hn, h, w_n):
    """The cell's new state: :func:`gru_jax._cell.reset_after_cell`, or
    :func:`gru_jax._cell.cell` with ``(r ⊙ h) W_hn`` for ``reset_after=False``."""
    if spec.reset_after:
        return _cell.reset_after_cell(a_r, a_z, x_n, hn, h)
    return _cell.cell(a_r, a_z, x_n, h, lambda r: dot(r * h, w_n, h.dtype))


def steps_loop(steps: int, body, carry, unroll: int, *, reverse: bool = False):
    """``body(t, carry)`` for ``t`` in ``[0, steps)`` (descending with ``reverse``), with an
    ``int32`` step index whatever ``jax_enable_x64`` says (lengths are ``int32``).

    Unrolled by hand, ``unroll`` steps per iteration and the remainder after the loop: the
    GPU lowering rejects ``fori_loop(..., unroll=n)``.
    """
    unroll = max(1, min(unroll, steps))
    full = steps // unroll

    def index(i):
        return jnp.int32(steps - 1) - i if reverse else i

    def run(i, c):
        for j in range(unroll):
            c = body(index(i * unroll + j), c)
        return c

    carry = jax.lax.fori_loop(np.int32(0), np.int32(full), run, carry)
    for i in range(full * unroll, steps):
        carry = body(index(jnp.int32(i)), carry)
    return carry


def forward_kernel(spec: Spec, steps: int, xp_ref, w_ref, b_ref, h0_ref, len_ref,
                   states_ref, last_ref):  # fmt: skip
    """One direction and row block: every step, ``w_hh`` loaded once before the loop."""
    hidden = h0_ref.shape[-1]
    ws = [gate(w_ref, g, hidden) for g in range(3)]
    b_hn = b_ref[...]
    lengths = len_ref[...]

    def body(t, h):
        xp = [gate(xp_ref, g, hidden, t) for g in range(3)]
        a_r, a_z, x_n, hn = step_pieces(spec, xp, h, ws, b_hn)
        h_new = new_state(spec, a_r, a_z, x_n, hn, h, ws[2])
        # Past a sequence's end its state is frozen, as with torch's PackedSequence.
        h_new = jnp.where(t < lengths, h_new, h)
        states_ref[t] = h_new
        return h_new

    last_ref[...] = steps_loop(steps, body, h0_ref[...], spec.unroll)


def specs(steps: int, rows: int, hidden: int):
    """The block specs, by kind of operand, over the grid ``(K, Bp // rows)``."""
    g = 3 * hidden
    return {
        "seq": pl.BlockSpec((None, steps, rows, g), lambda k, b: (k, 0, b, 0)),
        "state_seq": pl.BlockSpec((None, steps, rows, hidden), lambda k, b: (k, 0, b, 0)),
        "w": pl.BlockSpec((None, hidden, g), lambda k, b: (k, 0, 0)),
        "w_t": pl.BlockSpec((None, g, hidden), lambda k, b: (k, 0, 0)),
        "bias": pl.BlockSpec((None, 1, hidden), lambda k, b: (k, 0, 0)),
        "state": pl.BlockSpec((None, rows, hidden), lambda k, b: (k, b, 0)),
        "lengths": pl.BlockSpec((rows, 1), lambda k, b: (b, 0)),
    }


def run_forward(spec: Spec, xp, w, b_hn, h0, lengths):
    """The forward kernel: ``(states (K, T, Bp, Hp), h_last (K, Bp, Hp))``."""
    num_dirs, steps, batch, _ = xp.shape
    hidden = h0.shape[-1]
    s = specs(steps, spec.rows, hidden)
    return pl.pallas_call(
        functools.partial(forward_kernel, spec, steps),
        out_shape=(
            jax.ShapeDtypeStruct((num_dirs, steps, batch, hidden), h0.dtype),
            jax.ShapeDtypeStruct(h0.shape, h0.dtype),
        ),
        grid=(num_dirs, batch // spec.rows),
        in_specs=[s["seq"], s["w"], s["bias"], s["state"], s["lengths"]],
        out_specs=(s["state_seq"], s["state"]),
        interpret=spec.interpret,
        compiler_params=compiler_params(w),
        name="gru_forward",
    )(xp, w, b_hn, h0, lengths)
