"""The fused Pallas GRU kernels for TPUs (Mosaic): the same steps, TPU blocks.

The steps are those of the GPU kernels (:func:`gru_jax._pallas_kernel.forward_body`,
:func:`gru_jax._pallas_bwd.backward_body`); the blocking follows the TPU's rules:

* blocks tile as ``(8, 128)`` (rows, lanes): the hidden size is padded to a multiple of 128
  and the rows to a multiple of 8 (:data:`TPU_TILING`);
* a block is copied into VMEM whole before a program runs, so the grid walks blocks of
  time too, ``(K, Bp // rows, T' // Tc)``, with the state carried from one time block to
  the next in VMEM scratch. The time axis is declared ``"arbitrary"`` (sequential) and the
  directions and row blocks ``"parallel"``;
* ``w_hh`` (and, backward, its transpose) has the same block at every time block, so it is
  copied into VMEM once per direction and row block and stays there (768 KiB at H=256 in
  float32, half that in bfloat16).

On the CPU these launches run in Pallas's TPU interpret mode (``pltpu.InterpretParams``),
which checks the TPU's memory semantics; they have been lowered for TPUs (``jax.export``)
but not yet run on one.

This module imports jax and :mod:`gru_jax._pallas_kernel`, :mod:`gru_jax._pallas_bwd`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gru_jax import _pallas_bwd
from gru_jax import _pallas_kernel as _kernel

# Lanes of 128, sublanes of 8; at most 128 rows per program (one MXU pass).
TPU_TILING = _kernel.Tiling(128, False, 8, 128)
# The largest input-projection block of a program: with its double buffer and the other
# blocks it stays well inside the default scoped VMEM.
SEQ_BLOCK_BYTES = 2 << 20
SEMANTICS = ("parallel", "parallel", "arbitrary")


def time_block(steps: int, rows: int, hidden: int, itemsize: int) -> int:
    """Steps per time block: as many as fit :data:`SEQ_BLOCK_BYTES`, at most ``steps``."""
    return max(1, min(steps, SEQ_BLOCK_BYTES // (rows * 3 * hidden * itemsize)))


def specs(tc: int, nt: int, rows: int, hidden: int, *, reverse: bool):
    """The block specs over the grid ``(K, Bp // rows, T' // tc)``; with ``reverse`` the time
    blocks are walked from the last to the first."""
    g = 3 * hidden

    def tblock(t):
        return nt - 1 - t if reverse else t

    return {
        "seq": pl.BlockSpec((None, tc, rows, g), lambda k, b, t: (k, tblock(t), b, 0)),
        "state_seq": pl.BlockSpec((None, tc, rows, hidden), lambda k, b, t: (k, tblock(t), b, 0)),
        "w": pl.BlockSpec((None, hidden, g), lambda k, b, t: (k, 0, 0)),
        "w_t": pl.BlockSpec((None, g, hidden), lambda k, b, t: (k, 0, 0)),
        "bias": pl.BlockSpec((None, 1, hidden), lambda k, b, t: (k, 0, 0)),
        "state": pl.BlockSpec((None, rows, hidden), lambda k, b, t: (k, b, 0)),
        "lengths": pl.BlockSpec((rows, 1), lambda k, b, t: (b, 0)),
    }


def _pad(xp, w, b_hn, state, lengths, seqs=()) -> tuple[_kernel.Padded, int]:
    """The operands (as :func:`gru_jax._pallas_kernel.pad_operands` takes them) padded to
    the TPU's tiling, their sequences to whole time blocks: ``(padded, steps per block)``."""
    steps = xp.shape[1]
    p = _kernel.pad_operands(TPU_TILING, xp, w, b_hn, state, lengths, seqs)
    tc = time_block(steps, p.rows, p.arrays[3].shape[-1], jnp.dtype(state.dtype).itemsize)
    pad = [(0, 0), (0, -(-steps // tc) * tc - steps), (0, 0), (0, 0)]
    # xp first, the state sequences last (pad_operands' order).
    arrays = [jnp.pad(a, pad) if a.ndim == 4 else a for a in p.arrays]
    return p._replace(arrays=tuple(arrays)), tc


def _call(kernel, p: _kernel.Padded, tc: int, interpret: bool, *, reverse: bool, inputs,
          outputs, out_shape, name: str):  # fmt: skip
    """The ``pallas_call`` over the grid ``(K, Bp // rows, T' // tc)``, blocks by kind of
    operand (:func:`specs`), the state carried in one VMEM scratch block."""
    num_dirs, steps, batch, _ = p.arrays[0].shape
    state = p.arrays[3]
    s = specs(tc, steps // tc, p.rows, state.shape[-1], reverse=reverse)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_dirs, batch // p.rows, steps // tc),
        in_specs=[s[kind] for kind in inputs],
        out_specs=tuple(s[kind] for kind in outputs),
        scratch_shapes=[pltpu.VMEM((p.rows, state.shape[-1]), state.dtype)],
        interpret=pltpu.InterpretParams() if interpret else False,
        compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS),
        name=name,
    )


def forward_kernel(spec, tc: int, unroll: int, xp_ref, w_ref, b_ref, h0_ref, len_ref,
                   states_ref, last_ref, h_ref):  # fmt: skip
    """One direction, row block and time block; the state carried in ``h_ref`` (VMEM)."""
    tb = pl.program_id(2)

    @pl.when(tb == 0)
    def _():
        h_ref[...] = h0_ref[...]

    body = _kernel.forward_body(spec, xp_ref, w_ref, b_ref, len_ref, states_ref, offset=tb * tc)
    h_ref[...] = _kernel.steps_loop(tc, body, h_ref[...], unroll)
    # The block of h_last is the same at every time block: written back after the last.
    last_ref[...] = h_ref[...]


def forward_tpu(spec, interpret: bool, unroll: int, xp, w, b_hn, h0, lengths):
    """The forward kernel on a TPU (Mosaic), or in TPU interpret mode: ``(states
    (K, T, B, H), h_last (K, B, H))`` from unpadded operands."""
    steps = xp.shape[1]
    p, tc = _pad(xp, w, b_hn, h0, lengths)
    xp, w, b_hn, h0, lengths = p.arrays
    states, last = _call(
        functools.partial(forward_kernel, spec, tc, unroll), p, tc, interpret, reverse=False,
        inputs=("seq", "w", "bias", "state", "lengths"), outputs=("state_seq", "state"),
        out_shape=(
            jax.ShapeDtypeStruct((*xp.shape[:3], h0.shape[-1]), h0.dtype),
            jax.ShapeDtypeStruct(h0.shape, h0.dtype),
        ),
        name="gru_forward",
    )(xp, w, b_hn, h0, lengths)  # fmt: skip
    return states[:, :steps, : p.batch, : p.hidden], last[:, : p.batch, : p.hidden]


def backward_kernel(spec, tc: int, nt: int, unroll: int, xp_ref, hprev_ref, ds_ref, w_ref,
                    wt_ref, b_ref, dlast_ref, len_ref, dxp_ref, extra_ref, dh0_ref,
                    dh_ref):  # fmt: skip
    """One direction, row block and time block, backward in time; ``dh`` carried in
    ``dh_ref`` (VMEM)."""
    tb = pl.program_id(2)

    @pl.when(tb == 0)
    def _():
        dh_ref[...] = dlast_ref[...]

    body = _pallas_bwd.backward_body(
        spec, xp_ref, hprev_ref, ds_ref, w_ref, wt_ref, b_ref, len_ref, dxp_ref, extra_ref,
        offset=(nt - 1 - tb) * tc,
    )  # fmt: skip
    dh_ref[...] = _kernel.steps_loop(tc, body, dh_ref[...], unroll, reverse=True)
    dh0_ref[...] = dh_ref[...]


def backward_tpu(spec, interpret: bool, unroll: int, xp, hprev, d_states, w, b_hn, d_last,
                 lengths):  # fmt: skip
    """The backward kernel on a TPU (Mosaic), or in TPU interpret mode: ``(dxp
    (K, T, B, 3H), extra (K, T, B, H), dh0 (K, B, H))`` from unpadded operands."""
    steps = xp.shape[1]
    p, tc = _pad(xp, w, b_hn, d_last, lengths, (hprev, d_states))
    xp, w, b_hn, d_last, lengths, hprev, d_states = p.arrays
    dxp, extra, dh0 = _call(
        functools.partial(backward_kernel, spec, tc, xp.shape[1] // tc, unroll), p, tc,
        interpret, reverse=True,
        inputs=("seq", "state_seq", "state_seq", "w", "w_t", "bias", "state", "lengths"),
        outputs=("seq", "state_seq", "state"),
        out_shape=(
            jax.ShapeDtypeStruct(xp.shape, d_last.dtype),
            jax.ShapeDtypeStruct(hprev.shape, d_last.dtype),
            jax.ShapeDtypeStruct(d_last.shape, d_last.dtype),
        ),
        name="gru_backward",
    )(xp, hprev, d_states, w, jnp.swapaxes(w, 1, 2), b_hn, d_last, lengths)  # fmt: skip
    return (
        _kernel.unpad_gates(dxp[:, :steps, : p.batch], p.hidden),
        extra[:, :steps, : p.batch, : p.hidden],
        dh0[:, : p.batch, : p.hidden],
    )
