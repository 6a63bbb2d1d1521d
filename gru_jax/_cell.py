r"""The GRU cell: its equations, written once (:func:`cell`), and one step on arrays.

Every path of the package computes the cell by calling :func:`cell`: :func:`gru_step`, the
time loops of :mod:`gru_jax._loops` (both ``reset_after`` variants), and the derivative of
:mod:`gru_jax._derivative`, which takes the cell's partial derivatives from JAX's own
differentiation of :func:`cell` (:func:`reset_after_partials`).

Shape legend (used in every docstring of the package):

* ``B``: batch size; ``T``: time steps; ``D``: input features of a layer;
* ``H``: hidden size; ``G = 3H``: the three gates stacked in the order ``r, z, n``;
* ``L``: number of layers; ``K``: number of directions (1, or 2 when bidirectional).

Notation of the equations (gates stacked ``r, z, n`` along the last axis of every weight):

* ``a_r = x W_ir + b_ir + h W_hr + b_hr`` and ``a_z`` likewise: the pre-activations of the
  reset and update gates;
* ``x_n = x W_in + b_in``: the input side of the candidate ``n``;
* ``hn = h W_hn + b_hn``: its hidden side (reset-after cell).

This module imports only jax and :mod:`gru_jax._params`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from gru_jax import _params

Array = jax.Array
CellParams = Mapping[str, Array]


def sigmoid(x):
    """The logistic function, ``1 / (1 + exp(-x))``, computed as ``(1 + tanh(x / 2)) / 2``.

    XLA:CPU lowers ``jax.nn.sigmoid`` to an exp and a divide; the tanh form is cheaper there
    (measured: see the design log of the performance docs). Its absolute error is about an
    ulp of 1, so a gate near 0 loses relative precision, not absolute.
    """
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


def cell(a_r, a_z, x_n, h, n_hidden: Callable[[Array], Array]):
    r"""The GRU equations, from the gates' pre-activations to the new state.

    .. math::

        r &= \sigma(a_r), \qquad z = \sigma(a_z) \\
        n &= \tanh(x_n + \mathrm{n\_hidden}(r)) \\
        h' &= (1 - z) \odot n + z \odot h

    ``n_hidden`` is where the two variants differ: ``r ⊙ (h W_hn + b_hn)`` for the
    reset-after cell (torch, cuDNN), ``(r ⊙ h) W_hn + b_hn`` for Cho et al. (2014).

    Args:
      a_r, a_z: pre-activations of the reset and update gates, ``(..., H)``.
      x_n: the input side of the candidate, ``(..., H)``.
      h: the previous state, ``(..., H)``.
      n_hidden: maps ``r`` to the hidden side of the candidate's pre-activation.

    Returns:
      ``h'``, ``(..., H)``.
    """
    r = sigmoid(a_r)
    z = sigmoid(a_z)
    n = jnp.tanh(x_n + n_hidden(r))
    # (1 - z) * n + z * h, with one multiply fewer.
    return n + z * (h - n)


def reset_after_cell(a_r, a_z, x_n, hn, h):
    """:func:`cell` of the reset-after variant, given ``hn = h W_hn + b_hn``."""
    return cell(a_r, a_z, x_n, h, lambda r: r * hn)


def reset_after_partials(a_r, a_z, x_n, hn, h):
    r"""The reset-after cell's new state and its five partial derivatives.

    The cell is elementwise in its arguments, so one reverse pass of JAX's derivative of
    :func:`reset_after_cell` with a cotangent of ones gives every partial derivative:
    ``(∂h'/∂a_r, ∂h'/∂a_z, ∂h'/∂x_n, ∂h'/∂hn, ∂h'/∂h)``, each ``(..., H)``. The
    linearization of a step is then
    ``dh' = Σ ∂h'/∂u ⊙ du`` over those five arguments.

    Returns:
      ``(h', partials)``.
    """
    h_new, pullback = jax.vjp(reset_after_cell, a_r, a_z, x_n, hn, h)
    return h_new, pullback(jnp.ones_like(h_new))


def plus(a, b):
    """``a + b`` for a bias ``b`` (or ``None``): an ``(H,)`` bias is broadcast explicitly,
    since callers may run with ``jax_numpy_rank_promotion="raise"``."""
    if b is None:
        return a
    return a + (b.reshape((1,) * (a.ndim - 1) + b.shape) if b.ndim == 1 else b)


def wire(x, hp, b_hn=None):
    """The gate wiring: the cell's arguments from the input side and the hidden side.

    Every strategy (the XLA loops, both Pallas kernels) and the derivative call this, each
    after its own matmuls, so that which projection feeds which gate is written once.

    Args:
      x: ``(x_r, x_z, x_n)``, the input projections ``x W_i*`` of the three gates, each
        ``(..., H)``, their biases added (or folded in, see :func:`split_bias`).
      hp: ``(h_r, h_z, h_n)``, the hidden products ``h W_h*``; ``h_n`` is ``None`` for the
        reset-before cell, whose ``n`` gate multiplies ``r ⊙ h`` instead.
      b_hn: the hidden side's bias of ``n``, ``(H,)``, where ``h_n`` does not hold it
        (reset-after only), or ``None``.

    Returns:
      ``(a_r, a_z, x_n, hn)`` as :func:`cell` and :func:`reset_after_cell` take them
      (``hn`` ``None`` for the reset-before cell).
    """
    (x_r, x_z, x_n), (h_r, h_z, h_n) = x, hp
    hn = None if h_n is None else plus(h_n, b_hn)
    return x_r + h_r, x_z + h_z, x_n, hn


def gates(a, hidden: int):
    """The three ``(..., H)`` gate blocks ``r, z, n`` of a fused ``(..., 3H)`` array."""
    return tuple(a[..., g * hidden : (g + 1) * hidden] for g in range(3))


def fused_step(xp, h, w_hh, b_hn, *, reset_after: bool, compute_dtype):
    """A GRU step given the input projection ``xp`` of fused gates.

    Args:
      xp: ``x @ w_ih`` plus every bias not scaled by ``r`` (see :func:`split_bias`),
        ``(..., 3H)`` in the accumulation dtype.
      h: the previous state, ``(..., H)``, in the accumulation dtype.
      w_hh: ``(H, 3H)``, or ``(K, H, 3H)`` against ``h`` of shape ``(K, B, H)``.
      b_hn: ``(..., H)`` (reset-after with bias) or ``None``.
      reset_after: the variant (see :func:`cell`).
      compute_dtype: dtype of the matmul inputs; products accumulate in ``h``'s dtype.

    Returns:
      ``h'``, ``(..., H)``.
    """
    hidden = h.shape[-1]
    acc = h.dtype

    def mm(a, w):
        return jnp.matmul(
            a.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=acc
        )

    if reset_after:
        a_r, a_z, x_n, hn = wire(gates(xp, hidden), gates(mm(h, w_hh), hidden), b_hn)
        return reset_after_cell(a_r, a_z, x_n, hn, h)
    h_rz = mm(h, w_hh[..., : 2 * hidden])
    a_r, a_z, x_n, _ = wire(gates(xp, hidden), (h_rz[..., :hidden], h_rz[..., hidden:], None))
    return cell(a_r, a_z, x_n, h, lambda r: mm(r * h, w_hh[..., 2 * hidden :]))


def split_bias(b_ih, b_hh, hidden: int, reset_after: bool):
    """Folds every bias that is not multiplied by ``r`` into the input projection.

    Returns ``(bias_x, b_hn)``: ``bias_x`` (``(..., 3H)``) is added to ``x @ w_ih`` once for
    all steps; ``b_hn`` (``(..., H)`` or ``None``) stays inside the recurrence because the
    reset-after cell scales it by ``r``.
    """
    if b_ih is None:
        return None, None
    if not reset_after:
        return b_ih + b_hh, None
    zeros = jnp.zeros_like(b_hh[..., 2 * hidden :])
    bias_x = b_ih + jnp.concatenate([b_hh[..., : 2 * hidden], zeros], axis=-1)
    return bias_x, b_hh[..., 2 * hidden :]


def compute_dtypes(x_dtype, w_dtype, dtype):
    """``(compute_dtype, acc_dtype)``; explicit, so it also works under strict promotion.

    ``compute_dtype`` is ``dtype`` or the promoted dtype of ``x`` and the weights; the carry
    and every accumulation are float32, or float64 when the compute dtype is wider.
    """
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype must be a floating-point dtype or None; got {dtype}")
        compute = dtype
    else:
        with jax.numpy_dtype_promotion("standard"):
            compute = jnp.promote_types(x_dtype, w_dtype)
    acc = jnp.dtype(jnp.float64) if compute.itemsize > 4 else jnp.dtype(jnp.float32)
    return compute, acc


def check_float(name: str, x) -> None:
    """Raises ``TypeError`` naming ``name`` unless ``x`` is a floating-point array."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}")


def gru_step(cell_params: CellParams, h, x, *, reset_after: bool = True, dtype=None):
    r"""One GRU step, ``torch.nn.GRUCell`` semantics.

    With gates stacked in the order ``r, z, n`` along the last axis of the parameters
    (``W_i* = w_ih[:, gate]``, ``W_h* = w_hh[:, gate]``, likewise for the biases):

    .. math::

        r &= \sigma(x W_{ir} + b_{ir} + h W_{hr} + b_{hr}) \\
        z &= \sigma(x W_{iz} + b_{iz} + h W_{hz} + b_{hz}) \\
        n &= \tanh(x W_{in} + b_{in} + r \odot (h W_{hn} + b_{hn}))
             \quad\text{(reset\_after=True: torch, cuDNN, Keras default)} \\
        n &= \tanh(x W_{in} + b_{in} + (r \odot h) W_{hn} + b_{hn})
             \quad\text{(reset\_after=False: Cho et al. 2014)} \\
        h' &= (1 - z) \odot n + z \odot h

    Args:
      cell_params: ``{"w_ih": (D, 3H), "w_hh": (H, 3H)}`` plus, with bias,
        ``{"b_ih": (3H,), "b_hh": (3H,)}``.
      h: previous state, ``(*batch, H)``, floating point.
      x: input, ``(*batch, D)``, floating point; ``batch`` dims must broadcast with ``h``'s.
      reset_after: where the reset gate is applied (see above).
      dtype: dtype of the matmul inputs (e.g. ``jnp.bfloat16``); gates and the new state are
        computed in float32 (or float64 when the inputs are). ``None``: the promoted dtype of
        ``x`` and the parameters.

    Returns:
      The new state ``h'``, shape ``(*batch, H)``, dtype of ``h``.

    Raises:
      ValueError: if the parameter, ``h`` or ``x`` shapes do not match.
      TypeError: if ``h`` or ``x`` is not floating point.

    Example::

      >>> import jax, jax.numpy as jnp, gru_jax
      >>> cell = gru_jax.init_cell(jax.random.key(0), in_features=3, hidden_size=4)
      >>> gru_jax.gru_step(cell, jnp.zeros((2, 4)), jnp.ones((2, 3))).shape
      (2, 4)
    """
    in_features, hidden = _params.cell_dims(cell_params)
    h, x = jnp.asarray(h), jnp.asarray(x)
    check_float("h", h)
    check_float("x", x)
    if h.ndim < 1 or h.shape[-1] != hidden:
        raise ValueError(f"h must have shape (..., H) = (..., {hidden}); got {h.shape}")
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., D) = (..., {in_features}); got {x.shape}")
    try:
        jnp.broadcast_shapes(h.shape[:-1], x.shape[:-1])
    except ValueError:
        raise ValueError(
            f"h and x must have broadcastable batch dims; got h {h.shape}, x {x.shape}"
        ) from None
    compute_dtype, acc = compute_dtypes(x.dtype, cell_params["w_ih"].dtype, dtype)
    bias_x, b_hn = split_bias(cell_params.get("b_ih"), cell_params.get("b_hh"), hidden, reset_after)
    xp = jnp.matmul(
        x.astype(compute_dtype),
        cell_params["w_ih"].astype(compute_dtype),
        preferred_element_type=acc,
    )
    if bias_x is not None:
        # Explicit broadcasting: callers may run with jax_numpy_rank_promotion="raise".
        lead = (1,) * (xp.ndim - 1)
        xp = xp + bias_x.astype(acc).reshape(lead + bias_x.shape)
        b_hn = None if b_hn is None else b_hn.astype(acc).reshape(lead + b_hn.shape)
    h_new = fused_step(
        xp, h.astype(acc), cell_params["w_hh"], b_hn, reset_after=reset_after,
        compute_dtype=compute_dtype,
    )  # fmt: skip
    return h_new.astype(h.dtype)
