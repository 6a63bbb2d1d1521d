"""The plain-scan strategy: one ``lax.scan`` of the fused cell, differentiated by JAX.

The strategy of ``reset_after=False`` (Cho et al.): JAX's own autodiff differentiates it,
and it is the simplest loop (one fused ``(K, B, H) @ (K, H, 3H)`` matmul per step). The
variant's matmul after the reset gate leaves no room for the tricks of :mod:`gru_jax._xla`.
It computes either variant, so it is also the reference loop of the package.

This module imports jax and :mod:`gru_jax._cell`, :mod:`gru_jax._loops`,
:mod:`gru_jax._masking`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gru_jax import _cell, _loops, _masking


def layer(lp, xs, h0, lengths, opts: _loops.Options):
    """One layer, every direction in one ``lax.scan`` of the fused cell: a
    :class:`gru_jax._loops.Strategy` (arguments and results as documented there)."""
    acc_dtype, cd = h0.dtype, opts.compute_dtype
    w_ih, w_hh = lp["w_ih"], lp["w_hh"]
    num_dirs, hidden = w_hh.shape[0], w_hh.shape[1]
    bias_x, b_hn = _cell.split_bias(lp.get("b_ih"), lp.get("b_hh"), hidden, opts.reset_after)
    xs = _loops.time_major(xs, opts.time_axis)
    xp = jnp.stack(_loops.project_fused(xs, w_ih, bias_x, lengths, cd, acc_dtype), axis=1)
    b_hn = None if b_hn is None else b_hn[:, None, :].astype(acc_dtype)  # (K, 1, H)
    # (T, 1, B, 1) against h (K, B, H).
    mask = None if lengths is None else _masking.time_mask(lengths, xs.shape[0])[:, None]

    def body(h, inputs):
        xp_t, m_t = inputs
        h_new = _cell.fused_step(
            xp_t, h, w_hh, b_hn, reset_after=opts.reset_after, compute_dtype=cd
        )
        if m_t is not None:
            # Past a sequence's end its state is frozen, as with torch's PackedSequence.
            h_new = jnp.where(m_t, h_new, h)
        return h_new, h_new

    if opts.remat:
        body = jax.checkpoint(body)
    h_last, ys = _loops.scan(body, h0, (xp, mask), opts.unroll)  # ys: (T, K, B, H)
    states = tuple(ys[:, k] for k in range(num_dirs))
    return _loops.time_major(_loops.layer_output(states, lengths, 0), opts.time_axis), h_last
