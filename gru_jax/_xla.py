"""The reset-after strategy: XLA loops that keep no gates, with a custom JVP.

The strategy of ``reset_after=True`` (torch, cuDNN) on the XLA path. Its primal (inference)
is :func:`gru_jax._loops.inplace_forward`: the states are written over a projection that
nothing reads again, and with ``lengths`` (at ``unroll=1``, static shapes) the rows run
sorted by length in phases that skip most padded steps. Its derivative is the custom JVP of
:mod:`gru_jax._derivative`, whose transpose runs the backward loop with one small matmul per
step and the weight gradients as single big matmuls (with ``remat``, chunk by chunk).

This module imports jax and :mod:`gru_jax._cell`, :mod:`gru_jax._loops`,
:mod:`gru_jax._derivative`.
"""

from __future__ import annotations

import jax.numpy as jnp

from gru_jax import _cell, _derivative, _loops


def layer(lp, xs, h0, lengths, opts: _loops.Options):
    """One reset-after layer, every direction (the contract of :mod:`gru_jax._loops`).

    Args:
      lp: the layer's params, ``w_ih (K, D, 3H)``, ``w_hh (K, H, 3H)``, biases ``(K, 3H)``.
      xs: ``(T, B, D)`` (``(B, T, D)`` for ``opts.time_axis=1``), zero at padded steps.
      h0: ``(K, B, H)`` in the accumulation dtype.
      lengths: ``int32[B]`` in ``[0, T]`` or ``None``.
      opts: the static options (``reset_after`` True).

    Returns:
      ``(ys, h_n)``: ``ys`` ``(T, B, K*H)`` (``(B, T, K*H)``), zero at padded steps, and
      ``h_n`` ``(K, B, H)``, each direction's state after its last valid step.
    """
    w_ih, w_hh = lp["w_ih"], lp["w_hh"]
    bias_x, b_hn = _cell.split_bias(lp.get("b_ih"), lp.get("b_hh"), w_hh.shape[1], True)
    # h_n is the state after scan step length - 1 in both directions (h0 for length 0).
    states, h_last = _derivative.layer(opts, xs, w_ih, bias_x, w_hh, b_hn, h0, lengths)
    return _loops.layer_output(states, lengths, opts.time_axis), jnp.stack(h_last)
