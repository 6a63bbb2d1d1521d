"""The reverse-mode derivative of the fused Pallas GRU layer (:mod:`gru_jax._pallas`).

The rule of :func:`gru_jax._pallas.recurrence`'s ``custom_vjp``:

* :func:`forward` runs the forward kernel and keeps its inputs and the states;
* :func:`backward` launches one kernel that runs the state cotangent ``dh`` backward in time,
  with ``w_hh`` (and its transpose) resident. At each step it recomputes the gates'
  pre-activations from the saved previous state, takes the cell's pullback from JAX's own
  differentiation of the one cell function (:func:`gru_jax._cell.reset_after_cell`, or
  :func:`gru_jax._cell.cell`), writes the gates' cotangents, and carries
  ``dh_{t-1} = ∂h_t/∂h ⊙ dh_t + Σ_g da_g W_g^T`` on;
* the gradients of ``w_hh`` and ``b_hn`` are then single matmuls (sums) over all ``T*B``
  rows outside the kernel, and the gates' cotangents are the projections' cotangents, which
  JAX carries to ``x``, ``w_ih`` and the biases through the big input matmul.

For ``reset_after=True`` the ``n`` gate's hidden matmul is ``h W_hn``, whose cotangent the
kernel writes as its extra output; for ``reset_after=False`` it is ``(r ⊙ h) W_hn``, and
the kernel writes ``r ⊙ h`` instead (the left operand of that weight's gradient).

This module imports jax and :mod:`gru_jax._cell`, :mod:`gru_jax._pallas`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gru_jax import _cell, _pallas_kernel


def forward(spec, xp, w, b_hn, h0, lengths):
    """The forward pass of the ``custom_vjp``: outputs and residuals."""
    states, h_last = _pallas_kernel.run_forward(spec, xp, w, b_hn, h0, lengths)
    return (states, h_last), (xp, w, b_hn, h0, lengths, states)


def backward_kernel(spec, steps: int, xp_ref, hprev_ref, ds_ref, w_ref, wt_ref, b_ref,
                    dlast_ref, len_ref, dxp_ref, extra_ref, dh0_ref):  # fmt: skip
    """One direction and row block, steps ``T-1`` down to 0, ``w_hh`` loaded once."""
    hidden = dh0_ref.shape[-1]
    acc = dh0_ref.dtype
    ws = [_pallas_kernel.gate(w_ref, g, hidden) for g in range(3)]
    # W_g^T, so that every matmul of the loop is a plain (rows, Hp) @ (Hp, Hp).
    wts = [wt_ref[pl.ds(g * hidden, hidden), :] for g in range(3)]
    w_n = None if spec.reset_after else ws[2].astype(acc)
    b_hn = b_ref[...]
    lengths = len_ref[...]
    zero = jnp.zeros((), acc)

    def body(t, dh):
        dh = dh + ds_ref[t]
        h = hprev_ref[t]
        xp = [_pallas_kernel.gate(xp_ref, g, hidden, t) for g in range(3)]
        a_r, a_z, x_n, hn = _pallas_kernel.step_pieces(spec, xp, h, ws, b_hn)
        if spec.reset_after:
            _, pullback = jax.vjp(_cell.reset_after_cell, a_r, a_z, x_n, hn, h)
            d_ar, d_az, d_xn, extra, d_h = pullback(dh)
            d_h = d_h + _pallas_kernel.dot(extra, wts[2], acc)
        else:

            def cell(a_r, a_z, x_n, h):
                # The cell, handing out r ⊙ h (the operand of W_hn) as aux.
                seen = []

                def n_hidden(r):
                    seen.append(r * h)
                    # The forward's product (compute-dtype operands, exact products summed
                    # in acc) with an acc-dtype weight, whose transpose is then no
                    # mixed-dtype matmul (which the GPU lowering lacks).
                    u = seen[0].astype(ws[2].dtype).astype(acc)
                    return jnp.dot(u, w_n, preferred_element_type=acc)

                return _cell.cell(a_r, a_z, x_n, h, n_hidden), seen[0]

            _, pullback, extra = jax.vjp(cell, a_r, a_z, x_n, h, has_aux=True)
            d_ar, d_az, d_xn, d_h = pullback(dh)
        d_h = d_h + _pallas_kernel.dot(d_ar, wts[0], acc) + _pallas_kernel.dot(d_az, wts[1], acc)
        # Past a sequence's end the state was carried unchanged: so is its cotangent, and
        # the step's gates get none.
        live = t < lengths
        for g, d in enumerate((d_ar, d_az, d_xn)):
            dxp_ref[t, :, pl.ds(g * hidden, hidden)] = jnp.where(live, d, zero)
        extra_ref[t] = jnp.where(live, extra, zero)
        return jnp.where(live, d_h, dh)

    dh0_ref[...] = _pallas_kernel.steps_loop(steps, body, dlast_ref[...], spec.unroll, reverse=True)


def run_backward(spec, xp, hprev, d_states, w, b_hn, d_last, lengths):
    """The backward kernel: ``(dxp (K, T, Bp, 3Hp), extra (K, T, Bp, Hp), dh0 (K, Bp, Hp))``."""
    num_dirs, steps, batch, _ = xp.shape
    hidden = d_last.shape[-1]
    s = _pallas_kernel.specs(steps, spec.rows, hidden)
    acc = d_last.dtype
    # The kind of block (see _pallas_kernel.specs) of each input, in order.
    inputs = ("seq", "state_seq", "state_seq", "w", "w_t", "bias", "state", "lengths")
    return pl.pallas_call(
        functools.partial(backward_kernel, spec, steps),
        out_shape=(
            jax.ShapeDtypeStruct(xp.shape, acc),
            jax.ShapeDtypeStruct(hprev.shape, acc),
            jax.ShapeDtypeStruct(d_last.shape, acc),
        ),
        grid=(num_dirs, batch // spec.rows),
        in_specs=[s[kind] for kind in inputs],
        out_specs=(s["seq"], s["state_seq"], s["state"]),
        interpret=spec.interpret,
        compiler_params=_pallas_kernel.compiler_params(w),
        name="gru_backward",
    )(xp, hprev, d_states, w, jnp.swapaxes(w, 1, 2), b_hn, d_last, lengths)


def backward(spec, residuals, cotangents):
    """The backward pass of the ``custom_vjp``: cotangents of ``(xp, w, b_hn, h0, lengths)``."""
    xp, w, b_hn, h0, lengths, states = residuals
    d_states, d_last = cotangents
    acc = h0.dtype
    hidden = h0.shape[-1]
    hprev = jnp.concatenate([h0[:, None], states[:, :-1]], axis=1)  # (K, T, Bp, Hp)
    dxp, extra, dh0 = run_backward(spec, xp, hprev, d_states, w, b_hn, d_last, lengths)

    def weight_grad(a, d):
        # One (Hp, T*Bp) @ (T*Bp, ·) matmul per direction.
        return jnp.einsum("ktbi,ktbg->kig", a, d, preferred_element_type=acc)

    rz = dxp[..., : 2 * hidden]
    if spec.reset_after:
        # The n gate's hidden matmul h W_hn (+ b_hn) has cotangent `extra`.
        dw = weight_grad(hprev, jnp.concatenate([rz, extra], axis=-1))
        db = jnp.sum(extra, axis=(1, 2))[:, None]
    else:
        # (r ⊙ h) W_hn: `extra` is r ⊙ h, and the cotangent is that of x_n.
        dw = jnp.concatenate(
            [weight_grad(hprev, rz), weight_grad(extra, dxp[..., 2 * hidden :])], axis=-1
        )
        db = jnp.zeros_like(b_hn)
    return dxp, dw.astype(w.dtype), db.astype(b_hn.dtype), dh0, None
