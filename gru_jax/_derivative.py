r"""The derivative of a reset-after layer: a custom JVP whose transpose is cheap.

JAX's own derivative of a scanned cell accumulates the weight gradient ``h_{t-1}^T dG_t``
step by step inside the backward loop, a ``(H, B) @ (B, 3H)`` matmul per step. The rule here
linearizes the whole layer at once instead:

* the forward loop (:func:`gru_jax._loops.scan_with_partials`) hands out the cell's partial
  derivatives at every step, taken from JAX's differentiation of the one cell function
  (:func:`gru_jax._cell.reset_after_partials`); they become five per-step coefficient arrays;
* the tangent recurrence is then
  ``dh_t = s_t + Σ_g c_g,t ⊙ (dh_{t-1} @ W_g) + c_h,t ⊙ dh_{t-1}``, where ``s_t`` collects
  every tangent that does not go through ``dh_{t-1}`` (input, weights, biases) and is
  computed outside the loop (:func:`tangent_sources`);
* reverse mode transposes that: the backward loop does one ``(B, 3H) @ (3H, H)`` matmul per
  step and direction, and the weight gradients become single big matmuls over all ``T*B``
  rows.

With ``remat`` the tangent pass runs chunk by chunk, each chunk rerunning the forward loop
over its steps from the state before it, so that only one state per chunk is kept.

Only the JVP is custom, so forward and reverse mode (and their compositions) both work.
This module imports jax and :mod:`gru_jax._cell`, :mod:`gru_jax._loops`,
:mod:`gru_jax._remat`, :mod:`gru_jax._masking`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gru_jax import _cell, _loops, _masking, _remat
from gru_jax._loops import Options, Recurrence


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def layer(opts: Options, xs, w_ih, b_ih, w_hh, b_hh, h0, lengths):
    """One reset-after layer, every direction: the states in scan order and the last ones.

    Args:
      opts: unroll, remat, compute dtype, time axis.
      xs: ``(T, B, D)`` layer input (``(B, T, D)`` for ``opts.time_axis=1``), zero at
        padded steps.
      w_ih: ``(K, D, 3H)``; w_hh: ``(K, H, 3H)``; b_ih, b_hh: ``(K, 3H)``, or both
        ``None``.
      h0: ``(K, B, H)`` in the accumulation dtype.
      lengths: ``int32[B]`` or ``None``.

    Returns:
      ``(hs, h_last)``: ``hs[k]`` ``(T, B, H)`` (``(B, T, H)``), direction ``k``'s state
      after every step (padded steps unspecified), and ``h_last[k]`` ``(B, H)``, its state
      after the sequence's last step (``h0[k]`` for length 0), in the accumulation dtype.
      ``h_last`` is the loop's final carry, not a read of ``hs``, so that the caller's
      ``h_n`` does not keep ``hs`` alive.
    """
    return _loops.inplace_forward(opts, xs, w_ih, b_ih, w_hh, b_hh, h0, lengths)


def coefficients(partials, mask):
    """The tangent coefficients ``(c_g, c_f, c_h)`` of one direction from its partials.

    ``partials`` as :func:`gru_jax._loops.scan_with_partials` hands them out:
    ``c_g = [∂h'/∂a_r, ∂h'/∂a_z, ∂h'/∂hn]`` ``(T', B, 3H)`` multiplies the hidden-side
    tangents of the three gates; ``c_f = ∂h'/∂x_n`` and ``c_h = ∂h'/∂h`` ``(T', B, H)``.
    Where ``mask`` is False they are 0 (``c_h = 1``), so the tangent state is carried
    unchanged over padding.
    """
    c_g, c_f, c_h = partials
    if mask is not None:
        zero, one = jnp.zeros((), c_h.dtype), jnp.ones((), c_h.dtype)
        c_g, c_f = jnp.where(mask, c_g, zero), jnp.where(mask, c_f, zero)
        c_h = jnp.where(mask, c_h, one)
    return c_g, c_f, c_h


def _is_zero(t) -> bool:
    return t is None or isinstance(t, jax.custom_derivatives.SymbolicZero)


def _sum(terms):
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


def _gate_sum(a, gates: int):
    """``(..., G*H)`` -> ``(..., H)``: the sum over the ``G`` gate blocks."""
    return jnp.sum(a.reshape((*a.shape[:-1], gates, a.shape[-1] // gates)), axis=-2)


def tangent_sources(opts: Options, coefs, srcs, dsrcs, hprevs, w_ih, tangents):
    """Per direction, ``s_t``: every tangent of ``h_t`` that does not go through ``dh_{t-1}``.

    ``tangents = (dw_ih, db_ih, dw_hh, db_hh)`` (any may be a symbolic zero); ``dsrcs`` is
    ``None`` when the input has no tangent. Returns ``None`` for a direction without any.
    The matmuls use the whole ``(·, 3H)`` kernels, so that their transposes (the weight
    gradients) are single big matmuls.
    """
    dw_ih, db_ih, dw_hh, db_hh = tangents
    cd = opts.compute_dtype
    out = []
    for k, ((c_g, c_f, _), src, hprev) in enumerate(zip(coefs, srcs, hprevs, strict=True)):
        acc_dtype = hprev.dtype
        hidden = hprev.shape[-1]
        # Tangents of the input-side and hidden-side pre-activations, (T', B, 3H).
        x_part = _sum(
            [
                None if dsrcs is None else _loops.mm(dsrcs[k], w_ih[k], cd, acc_dtype),
                None if _is_zero(dw_ih) else _loops.mm(src, dw_ih[k], cd, acc_dtype),
            ]
        )
        if not _is_zero(db_ih):
            x_part = _cell.plus(x_part, db_ih[k].astype(acc_dtype))
        h_part = None if _is_zero(dw_hh) else _loops.mm(hprev, dw_hh[k], cd, acc_dtype)
        if not _is_zero(db_hh):
            h_part = _cell.plus(h_part, db_hh[k].astype(acc_dtype))
        terms = []
        if x_part is not None:
            # r, z: c_g * x; n: the input enters outside the reset gate, scaled by c_f.
            rz = slice(0, 2 * hidden)
            terms.append(_gate_sum(c_g[..., rz] * x_part[..., rz], 2))
            terms.append(c_f * x_part[..., 2 * hidden :])
        if h_part is not None:
            terms.append(_gate_sum(c_g * h_part, 3))
        out.append(_sum(terms))
    return out


def tangent_loop(opts: Options, w_hh, dh_init, sources, coefs):
    """``dh_t = s_t + Σ_g c_g (dh_{t-1} @ W_g) + c_h dh_{t-1}``: the last ``dh`` and every
    ``dh_t``, per direction.

    One ``(B, H) @ (H, 3H)`` matmul per step and direction. Its kernel is given transposed,
    ``dh @ (W^T)^T``, so that the reverse-mode transpose of this loop (the backward pass) is
    a plain ``(B, 3H) @ (3H, H)`` matmul per step with no per-step transposition.
    """
    cd = opts.compute_dtype
    num_dirs = len(dh_init)
    w_t = jnp.swapaxes(w_hh, 1, 2).astype(cd)
    sources = [
        jnp.zeros_like(c[1]) if s is None else s for s, c in zip(sources, coefs, strict=True)
    ]

    def body(dhs, inputs):
        s_t, c_t = inputs
        hps = _loops.hidden_matmuls(dhs, w_t, cd, transposed=True)
        new = []
        for k in range(num_dirs):
            c_g, _, c_h = c_t[k]
            new.append(s_t[k] + _gate_sum(c_g * hps[k], 3) + c_h * dhs[k])
        new = tuple(new)
        return new, new

    return _loops.scan(body, tuple(dh_init), (sources, coefs), opts.unroll)


def _stretch(opts: Options, rec: Recurrence, primals, tangents, dh, h_start, src_of, mask):
    """A stretch of steps (all of them, or one remat chunk) from the state before it:
    ``(states, last state, (last dh, every dh))``.

    ``src_of(a, k)`` reads direction ``k``'s steps of the input (or its tangent) ``a`` in
    scan order.
    """
    xs, w_ih, _, w_hh, _, h0, _ = primals
    dxs, dw_ih, db_ih, dw_hh, db_hh, _, _ = tangents
    acc_dtype, cd = h0.dtype, opts.compute_dtype
    num_dirs = w_hh.shape[0]
    srcs = [src_of(xs, k) for k in range(num_dirs)]
    xg = [_loops.project(src, w_ih[k], cd, acc_dtype) for k, src in enumerate(srcs)]
    h_last, (states, partials) = _loops.scan_with_partials(xg, rec, h_start, mask, opts)
    hprevs = [jnp.concatenate([h_start[k][None], states[k][:-1]], axis=0) for k in range(num_dirs)]
    coefs = [coefficients(partials[k], mask) for k in range(num_dirs)]
    dsrcs = None if _is_zero(dxs) else [src_of(dxs, k) for k in range(num_dirs)]
    sources = tangent_sources(opts, coefs, srcs, dsrcs, hprevs, w_ih, (dw_ih, db_ih, dw_hh, db_hh))
    return states, h_last, tangent_loop(opts, w_hh, dh, sources, coefs)


@layer.defjvp
def _layer_jvp(opts: Options, primals, tangents):
    if opts.time_axis and not opts.remat:
        # The derivative runs time-major (its scans and chunk gathers index time on axis 0):
        # a batch-first layer transposes its input and its states here, once each way. With
        # remat the chunks read a batch-first input where it lies instead: a transposed copy
        # would be kept for the backward pass.
        xs, *rest = primals
        dxs, *drest = tangents
        xs, dxs = jnp.swapaxes(xs, 0, 1), jnp.swapaxes(dxs, 0, 1)
        (hs, h_last), (dhs, dh_last) = _layer_jvp(
            opts._replace(time_axis=0), (xs, *rest), (dxs, *drest)
        )
        swap = functools.partial(jnp.swapaxes, axis1=0, axis2=1)
        return (tuple(map(swap, hs)), h_last), (tuple(map(swap, dhs)), dh_last)

    xs, w_ih, b_ih, w_hh, b_hh, h0, lengths = primals
    dh0 = tangents[5]
    num_dirs = w_hh.shape[0]
    ax = opts.time_axis  # 1 only with remat: xs and dxs are batch-first, the rest not
    steps, batch = xs.shape[ax], xs.shape[1 - ax]
    mask = None if lengths is None else _masking.time_mask(lengths, steps)
    dh_init = tuple(
        jnp.zeros_like(h0[k]) if _is_zero(dh0) else dh0[k].astype(h0.dtype) for k in range(num_dirs)
    )
    rec = Recurrence.of(w_hh, b_ih, b_hh, opts.compute_dtype, h0.dtype)
    stretch = functools.partial(_stretch, opts, rec, primals, tangents)

    if not opts.remat:
        hs, h_last, (dh_last, dhs) = stretch(
            dh_init, h0, lambda a, k: _loops.source(a, lengths, k), mask
        )
        return (hs, h_last), (dhs, dh_last)

    # remat: reverse mode keeps only the primal inputs and one state per chunk, not the
    # states of every step: the states are the layer's output, whose cotangent the backward
    # pass holds anyway. The whole tangent computation of a chunk is checkpointed, so the
    # forward loop reruns over the chunk's steps in the backward pass.
    hs, h_last = _remat.chunked_forward(opts, xs, w_ih, b_ih, w_hh, b_hh, h0, lengths)
    if not steps:  # nothing to rerun: empty states, and h_last is h0
        hs = tuple(_loops.time_major(h, ax) for h in hs)
        return (hs, h_last), (tuple(jnp.zeros_like(h) for h in hs), dh_init)
    chunk = _remat.remat_chunk(steps, batch)
    chunks = _remat.Chunks(steps, batch, chunk, lengths)

    def chunk_step(dh, inputs):
        t, h_before = inputs

        def src_of(a, k):
            # Padding steps (>= T) read step T - 1 and are masked off.
            return chunks.gather(a, chunks.src_steps(t, k), ax)

        return stretch(dh, h_before, src_of, chunks.mask(t, mask))[2]

    # The state before each chunk: h0, then the state after the last step of each chunk.
    befores = tuple(
        jnp.concatenate([h0[k][None], hs[k][chunk - 1 : (chunks.num - 1) * chunk : chunk]])
        for k in range(num_dirs)
    )
    # The tangent loop's final carry is dh_last: padded steps carry dh unchanged.
    dh_last, dhs = jax.lax.scan(
        jax.checkpoint(chunk_step, prevent_cse=False), dh_init, (chunks.times, befores)
    )
    dhs = tuple(chunks.unchunk(d) for d in dhs)
    hs = tuple(_loops.time_major(h, ax) for h in hs)
    return (hs, h_last), (tuple(_loops.time_major(d, ax) for d in dhs), dh_last)
