"""The backward kernel of the fused Pallas GRU layer: its step, and its GPU launch.

:func:`gru_jax._pallas.recurrence`'s ``custom_vjp`` runs it after the forward kernel. The
kernel runs the state cotangent ``dh`` backward in time, with ``w_hh`` (and its transpose)
resident. At each step (:func:`backward_body`) it recomputes the gates' pre-activations
from the saved previous state (the gate wiring of :func:`gru_jax._cell.wire`), takes the
cell's pullback from JAX's own differentiation of the one cell function
(:func:`gru_jax._cell.reset_after_cell`, or :func:`gru_jax._cell.cell`), writes the gates'
cotangents, and carries ``dh_{t-1} = ∂h_t/∂h ⊙ dh_t + Σ_g da_g W_g^T`` on. The gradients of
``w_hh`` and ``b_hn`` are then single matmuls (sums) over all ``T*B`` rows outside the
kernel (:func:`weight_grads`).

For ``reset_after=True`` the ``n`` gate's hidden matmul is ``h W_hn``, whose cotangent the
kernel writes as its extra output; for ``reset_after=False`` it is ``(r ⊙ h) W_hn``, and
the kernel writes ``r ⊙ h`` instead (the left operand of that weight's gradient).

This module imports jax and :mod:`gru_jax._cell`, :mod:`gru_jax._pallas_kernel`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gru_jax import _cell
from gru_jax import _pallas_kernel as _kernel


def _reset_before_pullback(a_r, a_z, x_n, h, w_n, compute_dtype):
    """The reset-before cell's pullback, handing out ``r ⊙ h`` (the operand of ``W_hn``)."""
    acc = h.dtype

    def cell(a_r, a_z, x_n, h):
        seen = []

        def n_hidden(r):
            seen.append(r * h)
            # The forward's product (compute-dtype operands, exact products summed in acc)
            # with an acc-dtype weight, whose transpose is then no mixed-dtype matmul
            # (which the GPU lowering lacks).
            u = seen[0].astype(compute_dtype).astype(acc)
            return jnp.dot(u, w_n, preferred_element_type=acc)

        return _cell.cell(a_r, a_z, x_n, h, n_hidden), seen[0]

    _, pullback, r_h = jax.vjp(cell, a_r, a_z, x_n, h, has_aux=True)
    return pullback, r_h


def backward_body(spec, xp_ref, hprev_ref, ds_ref, w_ref, wt_ref, b_ref, len_ref, dxp_ref,
                  extra_ref, offset=0):  # fmt: skip
    """The backward step ``body(t, dh)`` of a program: step ``t`` of its block of time
    (step ``offset + t`` of the sequence); it writes the gates' cotangents and the extra
    output at ``t`` and returns ``dh_{t-1}``. The weights are read here, once."""
    hidden = hprev_ref.shape[-1]
    acc = hprev_ref.dtype
    ws = [_kernel.gate(w_ref, g, hidden) for g in range(3)]
    # W_g^T, so that every matmul of the loop is a plain (rows, Hp) @ (Hp, Hp).
    wts = [wt_ref[pl.ds(g * hidden, hidden), :] for g in range(3)]
    w_n = None if spec.reset_after else ws[2].astype(acc)
    b_hn = b_ref[...]
    lengths = len_ref[...]
    zero = jnp.zeros((), acc)

    def body(t, dh):
        dh = dh + ds_ref[t]
        h = hprev_ref[t]
        xp = [_kernel.gate(xp_ref, g, hidden, t) for g in range(3)]
        a_r, a_z, x_n, hn = _kernel.step_pieces(spec, xp, h, ws, b_hn)
        if spec.reset_after:
            _, pullback = jax.vjp(_cell.reset_after_cell, a_r, a_z, x_n, hn, h)
            d_ar, d_az, d_xn, extra, d_h = pullback(dh)
            d_h = d_h + _kernel.dot(extra, wts[2], acc)
        else:
            pullback, extra = _reset_before_pullback(a_r, a_z, x_n, h, w_n, ws[2].dtype)
            d_ar, d_az, d_xn, d_h = pullback(dh)
        d_h = d_h + _kernel.dot(d_ar, wts[0], acc) + _kernel.dot(d_az, wts[1], acc)
        # Past a sequence's end the state was carried unchanged: so is its cotangent, and
        # the step's gates get none.
        live = offset + t < lengths
        for g, d in enumerate((d_ar, d_az, d_xn)):
            dxp_ref[t, :, pl.ds(g * hidden, hidden)] = jnp.where(live, d, zero)
        extra_ref[t] = jnp.where(live, extra, zero)
        return jnp.where(live, d_h, dh)

    return body


def backward_kernel(spec, steps: int, unroll: int, xp_ref, hprev_ref, ds_ref, w_ref, wt_ref,
                    b_ref, dlast_ref, len_ref, dxp_ref, extra_ref, dh0_ref):  # fmt: skip
    """One direction and row block, steps ``T-1`` down to 0, ``w_hh`` loaded once."""
    body = backward_body(
        spec, xp_ref, hprev_ref, ds_ref, w_ref, wt_ref, b_ref, len_ref, dxp_ref, extra_ref
    )
    dh0_ref[...] = _kernel.steps_loop(steps, body, dlast_ref[...], unroll, reverse=True)


def backward_gpu(spec, interpret: bool, unroll: int, xp, hprev, d_states, w, b_hn, d_last,
                 lengths):  # fmt: skip
    """The backward kernel on a GPU (Triton), or interpreted: ``(dxp (K, T, B, 3H),
    extra (K, T, B, H), dh0 (K, B, H))`` from unpadded operands."""
    p = _kernel.pad_operands(_kernel.GPU_TILING, xp, w, b_hn, d_last, lengths, (hprev, d_states))
    xp, w, b_hn, d_last, lengths, hprev, d_states = p.arrays
    num_dirs, steps, batch, _ = xp.shape
    hidden = d_last.shape[-1]
    s = _kernel.gpu_specs(steps, p.rows, hidden)
    acc = d_last.dtype
    # The kind of block (see _pallas_kernel.gpu_specs) of each input, in order.
    inputs = ("seq", "state_seq", "state_seq", "w", "w_t", "bias", "state", "lengths")
    dxp, extra, dh0 = pl.pallas_call(
        functools.partial(backward_kernel, spec, steps, unroll),
        out_shape=(
            jax.ShapeDtypeStruct(xp.shape, acc),
            jax.ShapeDtypeStruct(hprev.shape, acc),
            jax.ShapeDtypeStruct(d_last.shape, acc),
        ),
        grid=(num_dirs, batch // p.rows),
        in_specs=[s[kind] for kind in inputs],
        out_specs=(s["seq"], s["state_seq"], s["state"]),
        interpret=interpret,
        compiler_params=None if interpret else _kernel.triton_params(w[0].size * w.dtype.itemsize),
        name="gru_backward",
    )(xp, hprev, d_states, w, jnp.swapaxes(w, 1, 2), b_hn, d_last, lengths)
    return (
        _kernel.unpad_gates(dxp[:, :, : p.batch], p.hidden),
        extra[:, :, : p.batch, : p.hidden],
        dh0[:, : p.batch, : p.hidden],
    )


def weight_grads(spec, hprev, dxp, extra, w, b_hn):
    """The cotangents of ``w_hh (K, H, 3H)`` and ``b_hn (K, 1, H)``: one
    ``(H, T*B) @ (T*B, ·)`` matmul per direction from the backward kernel's outputs."""
    acc = hprev.dtype
    hidden = hprev.shape[-1]

    def grad(a, d):
        return jnp.einsum("ktbi,ktbg->kig", a, d, preferred_element_type=acc)

    rz = dxp[..., : 2 * hidden]
    if spec.reset_after:
        # The n gate's hidden matmul h W_hn (+ b_hn) has cotangent `extra`.
        dw = grad(hprev, jnp.concatenate([rz, extra], axis=-1))
        db = jnp.sum(extra, axis=(1, 2))[:, None]
    else:
        # (r ⊙ h) W_hn: `extra` is r ⊙ h, and the cotangent is that of x_n.
        dw = jnp.concatenate([grad(hprev, rz), grad(extra, dxp[..., 2 * hidden :])], axis=-1)
        db = jnp.zeros_like(b_hn)
    return dw.astype(w.dtype), db.astype(b_hn.dtype)
