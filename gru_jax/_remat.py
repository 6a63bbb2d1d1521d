"""``remat``: time chunks, and the forward pass that projects the input chunk by chunk.

With ``remat=True`` the derivative of a reset-after layer (:mod:`gru_jax._derivative`) keeps
one state per chunk of steps and reruns each chunk's steps in the backward pass. This module
holds what that needs: the chunking of the time axis (:class:`Chunks` and the chunk sizes)
and :func:`chunked_forward`, the forward pass that never holds every step's input
projections at once.

This module imports jax and :mod:`gru_jax._loops`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gru_jax._loops import Options, Recurrence, project, run_steps, time_major


class Chunks:
    """Time chunks of a layer (time-major): which steps each chunk covers and reads.

    ``times`` is ``int32[C, Tc]`` (``C * Tc >= T``; steps ``>= T`` are padding, masked off).
    """

    def __init__(self, steps: int, batch: int, chunk: int, lengths):
        self.steps, self.batch, self.chunk, self.lengths = steps, batch, chunk, lengths
        self.num = -(-steps // chunk)
        self.times = jnp.arange(self.num * chunk, dtype=jnp.int32).reshape(self.num, chunk)

    def gather(self, a, t, axis: int = 0):
        """``a`` ``(T, B, ...)`` at steps ``t`` ``(Tc,)``, or per-row steps ``t`` ``(Tc, B)``.

        ``axis=1``: ``a`` is ``(B, T, ...)``; the chunk comes back time-major all the same
        (only the chunk is transposed, never the whole array).
        """
        if t.ndim == 1:
            return time_major(jnp.take(a, t, axis=axis), axis)
        idx = t if axis == 0 else t.T
        idx = idx.reshape(idx.shape + (1,) * (a.ndim - 2))
        return time_major(jnp.take_along_axis(a, idx, axis=axis), axis)

    def src_steps(self, t, k: int):
        """Where each scan step of direction ``k`` reads the layer input (clipped to T-1)."""
        t = jnp.minimum(t, self.steps - 1)
        if k == 0:
            return t
        if self.lengths is None:
            return self.steps - 1 - t
        tb = jnp.broadcast_to(t[:, None], (t.shape[0], self.batch))
        n = self.lengths[None, :]
        return jnp.where(tb < n, n - 1 - tb, tb)

    def mask(self, t, mask):
        """``bool[Tc, B or 1, 1]``: the validity mask of the chunk (padding steps False)."""
        valid = (t < self.steps).reshape(self.chunk, 1, 1)
        if mask is None:
            return None if self.num * self.chunk == self.steps else valid
        return valid & self.gather(mask, jnp.minimum(t, self.steps - 1))

    def unchunk(self, a):
        """``(C, Tc, ...)`` -> ``(T, ...)``."""
        a = a.reshape((self.num * self.chunk, *a.shape[2:]))
        return a if self.num * self.chunk == self.steps else a[: self.steps]


def divisor_near(steps: int, target: int) -> int:
    """A divisor of ``steps`` in ``[target, 2 * target]`` (no padding chunk), else ``target``."""
    if target >= steps:
        return steps
    for c in range(target, min(2 * target, steps) + 1):
        if steps % c == 0:
            return c
    return target


def forward_chunk(steps: int, rows: int) -> int:
    """Time steps per chunk of :func:`chunked_forward`, for ``rows`` = batch size times the
    number of directions.

    Tuned for speed: each chunk projects ~2048 rows or more (summed over the directions),
    while the chunk's projections stay a fraction of a long sequence's (fresh memory costs
    page faults on the CPU); counting both directions' rows halves a bidirectional chunk,
    whose projections were the peak of the remat gradient. ``max(rows, 1)``: an empty batch
    (B = 0, as torch allows) is one chunk.
    """
    return divisor_near(steps, max(steps // 16, -(-2048 // max(rows, 1)), 16))


def remat_chunk(steps: int, batch: int) -> int:
    """Time steps per chunk of the tangent (so the backward) pass with ``remat=True``.

    Tuned for memory: a chunk's temporaries (about a dozen ``(Tc, B, H)`` arrays per
    direction) stay below the saved states with ``Tc ~ T/32``, while its matmuls keep 256
    rows or more.
    """
    return divisor_near(steps, max(steps // 32, -(-256 // max(batch, 1)), 1))


def chunked_forward(opts: Options, xs, w_ih, b_ih, w_hh, b_hh, h0, lengths):
    """The reset-after forward pass of ``remat`` (no gates kept), in bounded memory.

    Chosen by :mod:`gru_jax._derivative` under ``remat=True``. Unlike
    :func:`gru_jax._loops.inplace_forward`, which projects every step first, this projects
    chunk by chunk (see :func:`forward_chunk`), so that the projections never exist for all
    steps at once and the remat backward's memory stays near the saved states. The states
    are written in place into one time-major ``(T, B, H)`` array per direction; a
    batch-first input is read chunk by chunk where it lies, and the reverse direction
    gathers each chunk's steps.

    Arguments as :func:`gru_jax._loops.inplace_forward`. Returns ``(states, h_last)``, the
    states time-major.
    """
    ax, acc_dtype, cd = opts.time_axis, h0.dtype, opts.compute_dtype
    num_dirs, hidden = w_hh.shape[0], w_hh.shape[1]
    steps, batch = xs.shape[ax], xs.shape[1 - ax]
    rec = Recurrence.of(w_hh, b_ih, b_hh, cd, acc_dtype)
    carry = (
        tuple(h0[k] for k in range(num_dirs)),
        tuple(jnp.zeros((steps, batch, hidden), acc_dtype) for _ in range(num_dirs)),
    )
    if steps == 0:
        return carry[1], carry[0]
    chunk = forward_chunk(steps, batch * num_dirs)
    chunks = Chunks(steps, batch, chunk, lengths)
    tm = opts._replace(time_axis=0)

    def run(carry, start, size: int):
        """Steps ``[start, start + size)``: project them, then loop over them."""
        t = start + jnp.arange(size, dtype=jnp.int32)
        srcs = [time_major(jax.lax.dynamic_slice_in_dim(xs, start, size, ax), ax)] + [
            chunks.gather(xs, chunks.src_steps(t, k), ax) for k in range(1, num_dirs)
        ]
        xg = [project(src, w_ih[k], cd, acc_dtype) for k, src in enumerate(srcs)]
        return run_steps(
            tm, carry, xg, rec, lengths, start=start, stop=start + size, n_from_states=False,
            origin=start,
        )  # fmt: skip

    full, tail = divmod(steps, chunk)
    if full == 1:
        carry = run(carry, 0, chunk)
    else:
        carry = jax.lax.fori_loop(0, full, lambda c, cr: run(cr, c * chunk, chunk), carry)
    if tail:
        carry = run(carry, full * chunk, tail)
    return carry[1], carry[0]
