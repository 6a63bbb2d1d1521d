"""The reset-after strategy: XLA loops that keep no gates, with a custom JVP.

The strategy of ``reset_after=True`` (torch, cuDNN) on the XLA path. Its primal (inference)
is :func:`gru_jax._loops.inplace_forward`: the states are written over a projection that
nothing reads again, and with ``lengths`` (at ``unroll=1``, static shapes) the rows run
sorted by length in phases that skip most padded steps. Its derivative is the custom JVP of
:mod:`gru_jax._derivative`, whose transpose runs the backward loop with one small matmul per
step and the weight gradients as single big matmuls (with ``remat``, chunk by chunk).

This module imports jax and :mod:`gru_jax._loops`, :mod:`gru_jax._derivative`.
"""

from __future__ import annotations

import jax.numpy as jnp

from gru_jax import _derivative, _loops


def layer(lp, xs, h0, lengths, opts: _loops.Options):
    """One reset-after layer (``opts.reset_after`` True), every direction: a
    :class:`gru_jax._loops.Strategy` (arguments and results as documented there)."""
    w_ih, w_hh, b_ih, b_hh = lp["w_ih"], lp["w_hh"], lp.get("b_ih"), lp.get("b_hh")
    # h_n is the state after scan step length - 1 in both directions (h0 for length 0).
    states, h_last = _derivative.layer(opts, xs, w_ih, b_ih, w_hh, b_hh, h0, lengths)
    return _loops.layer_output(states, lengths, opts.time_axis), jnp.stack(h_last)
