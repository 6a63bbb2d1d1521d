"""The fused Pallas GRU kernels' shared pieces, and the forward kernel's GPU launch.

Both lowerings of the kernel (Triton for GPUs, here; Mosaic for TPUs, in
:mod:`gru_jax._pallas_tpu`) run the same step: :func:`forward_body` (and, for the backward
kernel, :func:`gru_jax._pallas_bwd.backward_body`) computes one step from the refs, with the
gate wiring of :func:`gru_jax._cell.wire` and the equations of :func:`gru_jax._cell.cell`.
What differs per lowering is the blocking around it: here each program holds its
direction's whole sequence (:func:`forward_gpu`); on a TPU the grid also walks blocks of
time with the state in VMEM scratch.

Every launch takes unpadded arrays and pads them to its own block rule (:class:`Tiling`):
hidden units and rows that padding adds stay 0 (their weights and initial state are 0; the
rows have length 0) and are sliced off.

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

# A guess, unmeasured: the register budget per thread for the resident weight (128 of the
# 255 32-bit registers a thread may have), leaving room for the state and the gates.
WEIGHT_BYTES_PER_THREAD = 512


class Spec(NamedTuple):
    """The static configuration of the kernels (hashable: a primitive's parameter).

    ``unroll``: of the in-kernel time loop; ``None``: the default of the platform the kernel
    is lowered for. ``cpu_kernel``: which kernel the CPU runs interpreted: ``"gpu"`` (the
    generic interpreter) or ``"tpu"`` (Pallas's TPU interpret mode, which checks TPU memory
    semantics).
    """

    reset_after: bool
    unroll: int | None
    compute_dtype: Any
    cpu_kernel: str = "gpu"


class Tiling(NamedTuple):
    """A lowering's block rule: how the hidden size and the rows are padded."""

    hidden_multiple: int  # Hp is a multiple of this (TPU lanes) ...
    power_of_two: bool  # ... or a power of two of at least it (GPU matmul operands)
    row_multiple: int  # Bp (rows) likewise
    row_block: int  # the most rows per program

    def hidden(self, n: int) -> int:
        return _round(n, self.hidden_multiple, self.power_of_two)

    def rows(self, n: int) -> tuple[int, int]:
        """``(Bp, rows per program)`` for a batch of ``n``."""
        bp = _round(n, self.row_multiple, self.power_of_two)
        rows = min(bp, self.row_block)
        return -(-bp // rows) * rows, rows


def _round(n: int, least: int, power_of_two: bool) -> int:
    if power_of_two:
        return max(least, 1 << max(0, int(n) - 1).bit_length())
    return max(least, -(-int(n) // least) * least)


# Triton: matmul operands need power-of-two blocks of at least 16; a large batch spreads
# over the chip in programs of at most 64 rows.
GPU_TILING = Tiling(16, True, 16, 64)


def triton_params(w_bytes: int):
    """Triton's launch: enough warps that the resident ``w`` (one direction's
    ``(Hp, 3Hp)`` block, ``w_bytes``) takes at most :data:`WEIGHT_BYTES_PER_THREAD` of each
    thread's registers, 4 to 16 warps (the Mosaic GPU lowering's copy rules reject small
    blocks, so Triton it is)."""
    warps = _round(-(-w_bytes // (32 * WEIGHT_BYTES_PER_THREAD)), 4, True)
    return pltriton.CompilerParams(num_warps=min(warps, 16), num_stages=1)


def pad_to(a, shape):
    """``a`` padded with zeros at the end of each axis to ``shape``."""
    return jnp.pad(a, [(0, s - n) for n, s in zip(a.shape, shape, strict=True)])


def pad_gates(a, hidden: int, shape):
    """A ``(..., 3H)`` array padded to ``shape`` ``(..., 3Hp)``: each gate's block padded
    with zeros, so that gate ``g`` sits at columns ``[g Hp, (g+1) Hp)``."""
    hp = shape[-1] // 3
    a = a.reshape((*a.shape[:-1], 3, hidden))
    return pad_to(a, (*shape[:-1], 3, hp)).reshape(shape)


def unpad_gates(a, hidden: int):
    """The inverse of :func:`pad_gates` on the last axis (leading axes already sliced)."""
    hp = a.shape[-1] // 3
    return a.reshape((*a.shape[:-1], 3, hp))[..., :hidden].reshape((*a.shape[:-1], 3 * hidden))


def gate(ref, g: int, hidden: int, t=None):
    """Gate ``g``'s ``hidden`` columns of a ``(..., 3Hp)`` ref (at step ``t`` if given)."""
    cols = pl.ds(g * hidden, hidden)
    return ref[:, cols] if t is None else ref[t, :, cols]


def dot(a, w, acc_dtype):
    """``a @ w`` with ``a`` cast to ``w``'s (the compute) dtype, accumulated in ``acc_dtype``."""
    return jnp.dot(a.astype(w.dtype), w, preferred_element_type=acc_dtype)


def step_pieces(spec: Spec, xp, h, ws, b_hn):
    """The arguments of the cell at one step: the hidden matmuls, then
    :func:`gru_jax._cell.wire`.

    Args:
      spec: the kernel configuration.
      xp: the three ``(rows, Hp)`` input projections of the step (biases folded in).
      h: the previous state ``(rows, Hp)``.
      ws: the three ``(Hp, Hp)`` gate blocks of ``w_hh`` in the compute dtype.
      b_hn: ``(1, Hp)``, the bias scaled by the reset gate (zeros without one).

    Returns:
      ``(a_r, a_z, x_n, hn)`` (``hn`` ``None`` for ``reset_after=False``).
    """
    acc = h.dtype
    h_n = dot(h, ws[2], acc) if spec.reset_after else None
    return _cell.wire(xp, (dot(h, ws[0], acc), dot(h, ws[1], acc), h_n), b_hn)


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


def forward_body(spec: Spec, xp_ref, w_ref, b_ref, len_ref, states_ref, offset=0):
    """The forward step ``body(t, h)`` of a program: step ``t`` of its block of time, which
    is step ``offset + t`` of the sequence; it writes the new state to ``states_ref[t]``.
    ``w_hh`` is read from ``w_ref`` here, once, before the loop."""
    hidden = states_ref.shape[-1]
    ws = [gate(w_ref, g, hidden) for g in range(3)]
    b_hn = b_ref[...]
    lengths = len_ref[...]

    def body(t, h):
        xp = [gate(xp_ref, g, hidden, t) for g in range(3)]
        a_r, a_z, x_n, hn = step_pieces(spec, xp, h, ws, b_hn)
        h_new = new_state(spec, a_r, a_z, x_n, hn, h, ws[2])
        # Past a sequence's end its state is frozen, as with torch's PackedSequence.
        h_new = jnp.where(offset + t < lengths, h_new, h)
        states_ref[t] = h_new
        return h_new

    return body


def gpu_specs(steps: int, rows: int, hidden: int):
    """The GPU block specs, by kind of operand, over the grid ``(K, Bp // rows)``: each
    program holds its direction's whole sequence."""
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


class Padded(NamedTuple):
    """The kernels' operands padded to a tiling, and what slicing them back needs."""

    hidden: int  # H, before padding
    batch: int  # B, before padding
    rows: int  # rows per program
    arrays: tuple


def pad_operands(tiling: Tiling, xp, w, b_hn, h0, lengths, seqs=()) -> Padded:
    """Pads ``xp (K, T, B, 3H)``, ``w (K, H, 3H)``, ``b_hn (K, 1, H)``, ``h0 (K, B, H)``,
    ``lengths (B, 1)`` and any state sequences ``(K, T, B, H)`` in ``seqs`` to ``tiling``."""
    num_dirs, steps, batch, _ = xp.shape
    hidden = h0.shape[-1]
    hp = tiling.hidden(hidden)
    bp, rows = tiling.rows(batch)
    arrays = (
        pad_gates(xp, hidden, (num_dirs, steps, bp, 3 * hp)),
        pad_gates(pad_to(w, (num_dirs, hp, 3 * hidden)), hidden, (num_dirs, hp, 3 * hp)),
        pad_to(b_hn, (num_dirs, 1, hp)),
        pad_to(h0, (num_dirs, bp, hp)),
        pad_to(lengths, (bp, 1)),
        *(pad_to(s, (num_dirs, steps, bp, hp)) for s in seqs),
    )
    return Padded(hidden, batch, rows, arrays)


def forward_kernel(spec: Spec, steps: int, unroll: int, xp_ref, w_ref, b_ref, h0_ref, len_ref,
                   states_ref, last_ref):  # fmt: skip
    """One direction and row block: every step, ``w_hh`` loaded once before the loop."""
    body = forward_body(spec, xp_ref, w_ref, b_ref, len_ref, states_ref)
    last_ref[...] = steps_loop(steps, body, h0_ref[...], unroll)


def forward_gpu(spec: Spec, interpret: bool, unroll: int, xp, w, b_hn, h0, lengths):
    """The forward kernel on a GPU (Triton), or interpreted: ``(states (K, T, B, H),
    h_last (K, B, H))`` from unpadded operands (see :func:`gru_jax._pallas.recurrence`)."""
    p = pad_operands(GPU_TILING, xp, w, b_hn, h0, lengths)
    xp, w, b_hn, h0, lengths = p.arrays
    num_dirs, steps, batch, _ = xp.shape
    hidden = h0.shape[-1]
    s = gpu_specs(steps, p.rows, hidden)
    states, last = pl.pallas_call(
        functools.partial(forward_kernel, spec, steps, unroll),
        out_shape=(
            jax.ShapeDtypeStruct((num_dirs, steps, batch, hidden), h0.dtype),
            jax.ShapeDtypeStruct(h0.shape, h0.dtype),
        ),
        grid=(num_dirs, batch // p.rows),
        in_specs=[s["seq"], s["w"], s["bias"], s["state"], s["lengths"]],
        out_specs=(s["state_seq"], s["state"]),
        interpret=interpret,
        compiler_params=None if interpret else triton_params(w[0].size * w.dtype.itemsize),
        name="gru_forward",
    )(xp, w, b_hn, h0, lengths)
    return states[:, :, : p.batch, : p.hidden], last[:, : p.batch, : p.hidden]
