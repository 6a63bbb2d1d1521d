r"""Pure-JAX GRU: one cell step, the time scan of a layer, and the layer stack.

Shape legend (used in every docstring of the package):

* ``B``: batch size; ``T``: time steps; ``D``: input features of a layer;
* ``H``: hidden size; ``G = 3H``: the three gates stacked in the order ``r, z, n``;
* ``L``: number of layers; ``K``: number of directions (1, or 2 when bidirectional).

Parameter trees (plain dicts of arrays, shared by the linen and NNX modules):

* a *cell* (one layer, one direction), as :func:`gru_step` takes it::

      {"w_ih": (D, 3H), "w_hh": (H, 3H), "b_ih": (3H,), "b_hh": (3H,)}

* a *stack*, as :func:`gru` takes it; directions are stacked on a leading ``K`` axis
  (index 0 forward, 1 reverse) so that both directions share one scan::

      {"layer_0": {"w_ih": (K, D, 3H), "w_hh": (K, H, 3H), "b_ih": (K, 3H), "b_hh": (K, 3H)},
       "layer_1": {"w_ih": (K, K*H, 3H), ...}, ...}

  ``b_ih``/``b_hh`` are absent when the layer has no bias. The kernels are the transposes
  of torch's ``weight_ih_l{l}`` / ``weight_hh_l{l}`` (``x @ w_ih`` rather than
  ``W x``); :mod:`gru_jax.interop` converts.
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gru_jax import _masking

Array = jax.Array
CellParams = Mapping[str, Array]
Params = Mapping[str, CellParams]

_CELL_KEYS = frozenset({"w_ih", "w_hh", "b_ih", "b_hh"})


# --------------------------------------------------------------------------------------------
# The cell
# --------------------------------------------------------------------------------------------


def _split_bias(b_ih, b_hh, hidden: int, reset_after: bool):
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
    return b_ih + jnp.concatenate([b_hh[..., : 2 * hidden], zeros], axis=-1), b_hh[
        ..., 2 * hidden :
    ]


def _sigmoid(x):
    """The logistic function, ``1 / (1 + exp(-x))``, computed as ``(1 + tanh(x / 2)) / 2``.

    XLA:CPU lowers ``jax.nn.sigmoid`` to an exp and a divide. The tanh form is cheaper there:
    a 128-step loop of one direction's gate math at B32 H256 took 22-23 vs 33-39 us per
    step, and the inference forward got 1-6% faster (11 of 12 interleaved runs over the
    four bench configs). Its absolute error is about an ulp of 1 (float32: 1.4e-7, against
    8.9e-8 for ``jax.nn.sigmoid``), so a gate near 0 loses relative precision (7e-5 at
    1e-3), not absolute: the bench configs' outputs moved by at most 2.6e-7.
    """
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


def _recurrence(xp, h, w_hh, b_hn, *, reset_after: bool, compute_dtype):
    """The part of a GRU step that depends on ``h``, given the input projection ``xp``.

    ``xp = x @ w_ih + bias_x`` (``(..., 3H)``, float32 or wider); ``h`` (``(..., H)``) is the
    float carry; ``w_hh`` is ``(H, 3H)`` or batched ``(K, H, 3H)`` against ``h`` of shape
    ``(K, B, H)``. Matmul inputs are cast to ``compute_dtype`` and accumulate in the carry
    dtype.
    """
    hidden = h.shape[-1]
    acc = h.dtype

    def mm(a, w):
        return jnp.matmul(
            a.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=acc
        )

    if reset_after:
        hp = mm(h, w_hh)
        rz = _sigmoid(xp[..., : 2 * hidden] + hp[..., : 2 * hidden])
        r, z = rz[..., :hidden], rz[..., hidden:]
        hn = hp[..., 2 * hidden :]
        if b_hn is not None:
            hn = hn + b_hn
        n = jnp.tanh(xp[..., 2 * hidden :] + r * hn)
    else:
        rz = _sigmoid(xp[..., : 2 * hidden] + mm(h, w_hh[..., : 2 * hidden]))
        r, z = rz[..., :hidden], rz[..., hidden:]
        n = jnp.tanh(xp[..., 2 * hidden :] + mm(r * h, w_hh[..., 2 * hidden :]))
    # (1 - z) * n + z * h, with one multiply fewer.
    return n + z * (h - n)


def _check_cell_params(cell_params, name: str = "cell_params"):
    if not isinstance(cell_params, Mapping):
        raise TypeError(f"{name} must be a mapping of arrays; got {type(cell_params).__name__}")
    keys = set(cell_params)
    has_bias = {"b_ih", "b_hh"} & keys
    missing = {"w_ih", "w_hh"} - keys
    if has_bias and len(has_bias) != 2:
        missing |= {"b_ih", "b_hh"} - keys
    extra = keys - _CELL_KEYS
    if missing or extra:
        raise ValueError(
            f"{name} must have keys w_ih, w_hh and optionally b_ih, b_hh; "
            f"missing {sorted(missing)}, unexpected {sorted(extra)}"
        )


def _cell_dims(cell_params, name: str = "cell_params"):
    """Returns ``(D, H)`` of a cell, checking that its arrays agree."""
    _check_cell_params(cell_params, name)
    w_ih, w_hh = cell_params["w_ih"], cell_params["w_hh"]
    if w_hh.ndim != 2 or w_hh.shape[1] != 3 * w_hh.shape[0]:
        raise ValueError(f"{name}['w_hh'] must have shape (H, 3H); got {w_hh.shape}")
    hidden = w_hh.shape[0]
    if w_ih.ndim != 2 or w_ih.shape[1] != 3 * hidden:
        raise ValueError(
            f"{name}['w_ih'] must have shape (D, 3H) = (D, {3 * hidden}); got {w_ih.shape}"
        )
    for b in ("b_ih", "b_hh"):
        if b in cell_params and cell_params[b].shape != (3 * hidden,):
            raise ValueError(
                f"{name}['{b}'] must have shape (3H,) = ({3 * hidden},); got {cell_params[b].shape}"
            )
    return w_ih.shape[0], hidden


def _dtypes(x_dtype, w_dtype, dtype):
    """``(compute_dtype, acc_dtype)``; explicit, so it also works under strict promotion."""
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


def _check_float(name: str, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}")


# The unroll factor of ``unroll=None`` on backends other than the CPU. On an H100 (jax 0.11.2,
# BENCHMARKS.md "GPU") unrolling by 8 made the forward 1.4-4.5x and the training step
# 1.6-2.1x faster than unroll 1 on the four bench configs: every loop iteration costs kernel
# launches and the loop's condition; 16 and 32 gained no more, and 32 slowed training.
ACCELERATOR_UNROLL = 8


def default_unroll(backend: str | None = None) -> int:
    """The time loops' unroll factor that ``unroll=None`` stands for on ``backend``.

    ``1`` on the CPU, where a loop iteration is a few thunks and unrolling measured no faster
    (BENCHMARKS.md, "Tried and dropped"); :data:`ACCELERATOR_UNROLL` (8) on any other
    backend: on a GPU every iteration costs kernel launches (measured there; a TPU takes
    the same value unmeasured).

    Args:
      backend: a JAX platform name (``"cpu"``, ``"gpu"``, ``"tpu"``, ...); ``None``: the
        platform that computations go to at trace time: that of ``jax.default_device``
        where one is set (say the CPU, on a machine with a GPU), else
        ``jax.default_backend()``.
    """
    if backend is None:
        device = jax.config.jax_default_device
        if device is None:
            backend = jax.default_backend()
        else:  # a Device, or a platform name
            backend = device if isinstance(device, str) else device.platform
    return 1 if backend == "cpu" else ACCELERATOR_UNROLL


def _check_unroll(unroll) -> int:
    if unroll is None:
        return default_unroll()
    try:  # any integer type (Python or NumPy), but not a float or a bool
        value = None if isinstance(unroll, bool) else operator.index(unroll)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"unroll must be an integer >= 1 or None; got {unroll!r}")
    return value


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
    """
    in_features, hidden = _cell_dims(cell_params)
    h, x = jnp.asarray(h), jnp.asarray(x)
    _check_float("h", h)
    _check_float("x", x)
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
    compute_dtype, acc = _dtypes(x.dtype, cell_params["w_ih"].dtype, dtype)
    bias_x, b_hn = _split_bias(
        cell_params.get("b_ih"), cell_params.get("b_hh"), hidden, reset_after
    )
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
    h_new = _recurrence(
        xp,
        h.astype(acc),
        cell_params["w_hh"],
        b_hn,
        reset_after=reset_after,
        compute_dtype=compute_dtype,
    )
    return h_new.astype(h.dtype)


# --------------------------------------------------------------------------------------------
# One layer, generic: fused (K, H, 3H) cell, both directions in one scan
# --------------------------------------------------------------------------------------------


def _layer_generic(
    lp, xs, h0, mask, lengths, *, reset_after, unroll, remat, compute_dtype, acc_dtype
):
    """Runs one layer, all directions in one scan of the fused cell (any ``reset_after``).

    JAX's own autodiff; used for ``reset_after=False``. Arguments and result as
    :func:`_layer`.
    """
    w_ih, w_hh = lp["w_ih"], lp["w_hh"]
    num_dirs, hidden = w_hh.shape[0], w_hh.shape[1]
    bias_x, b_hn = _split_bias(lp.get("b_ih"), lp.get("b_hh"), hidden, reset_after)
    xs_c = xs.astype(compute_dtype)
    w_ih_c = w_ih.astype(compute_dtype)
    # The input projection of every step is one matmul outside the recurrence. The reverse
    # direction reads its input in valid-prefix-reversed order, so its scan runs forward.
    per_dir = []
    for k in range(num_dirs):
        src = _source(xs_c, lengths, k)
        xp_k = jnp.einsum("tbd,dg->tbg", src, w_ih_c[k], preferred_element_type=acc_dtype)
        if bias_x is not None:
            xp_k = xp_k + bias_x[k].astype(acc_dtype)[None, None, :]
        per_dir.append(xp_k)
    xp = jnp.stack(per_dir, axis=1)  # (T, K, B, 3H)
    b_hn = None if b_hn is None else b_hn[:, None, :].astype(acc_dtype)  # (K, 1, H)

    def step(h, inputs):
        xp_t, m_t = inputs
        h_new = _recurrence(
            xp_t, h, w_hh, b_hn, reset_after=reset_after, compute_dtype=compute_dtype
        )
        if m_t is not None:
            # Past a sequence's end its state is frozen, as with torch's PackedSequence.
            h_new = jnp.where(m_t, h_new, h)
        return h_new, h_new

    if remat:
        step = jax.checkpoint(step)
    step_mask = None if mask is None else mask[:, None]  # (T, 1, B, 1), against h (K, B, H)
    h_n, ys = jax.lax.scan(step, h0, (xp, step_mask), unroll=unroll)  # ys: (T, K, B, H)
    outs = []
    for k in range(num_dirs):
        y = ys[:, k]
        if k == 1:
            y = _masking.reverse_valid(y, lengths)
        outs.append(y)
    y = outs[0] if num_dirs == 1 else jnp.concatenate(outs, axis=-1)
    if mask is not None:
        y = jnp.where(mask, y, jnp.zeros((), y.dtype))
    return y, h_n


# --------------------------------------------------------------------------------------------
# One layer, reset_after=True: per-gate matmuls, and a custom JVP whose transpose is cheap
# --------------------------------------------------------------------------------------------
#
# Layout (chosen by measurement on CPU, see BENCHMARKS.md): the input projections are separate
# per-gate arrays (slicing a fused (..., 3H) array inside the loop is slow), while each step
# runs one (B, H) @ (H, 3H) hidden matmul, batched over the K directions. Inference works in
# the caller's layout (batch-first input read and output written in place); the derivative
# works time-major.
#
# Differentiation. JAX's own derivative of a scanned cell accumulates the weight gradient
# ``h_{t-1}^T dG_t`` step by step inside the backward loop, a (H, B) @ (B, 3H) matmul per step.
# The rule below instead linearizes the whole layer at once:
#
#   * the forward loop hands out its gates, which are folded into five per-step coefficient
#     arrays outside the loop (with ``remat`` each chunk of the tangent pass reruns the
#     forward loop over its steps from the state before the chunk instead, so that only one
#     state per chunk is kept for the backward pass);
#   * the tangent recurrence is then ``dh_t = s_t + sum_g c_g,t * (dh_{t-1} @ W_g) + z_t dh_{t-1}``
#     where ``s_t`` collects every tangent that does not depend on ``dh`` (input, weights,
#     biases) and is computed outside the loop;
#   * reverse mode transposes that: the backward loop does one (B, H) @ (H, H) matmul per gate
#     and step, and the weight gradients become single big matmuls over all T*B rows.
#
# Both forward and reverse mode (and their compositions) work, because only the JVP is custom.


class _Static(NamedTuple):
    """Hashable options of :func:`_layer_ra` (its ``nondiff_argnums``).

    ``time_axis``: the time axis of the layer's input and states (0: ``(T, B, ·)``, 1:
    ``(B, T, ·)``, a batch-first input read where it lies).
    """

    unroll: int
    remat: bool
    compute_dtype: Any
    time_axis: int = 0


def _mm(a, w, compute_dtype, acc_dtype, spec: str = "...i,io->...o"):
    """``a @ w`` (or another 2-operand ``spec``) with inputs in ``compute_dtype``.

    Leading axes of ``a`` are flattened into one: a 2-D matmul, whose transposes (the weight
    gradients) XLA:CPU runs ~2.5x faster than those of a ``(T, B, D)`` einsum.
    """
    a, w = a.astype(compute_dtype), w.astype(compute_dtype)
    if a.ndim > 2 and spec == "...i,io->...o":
        out = jnp.matmul(a.reshape(-1, a.shape[-1]), w, preferred_element_type=acc_dtype)
        return out.reshape((*a.shape[:-1], w.shape[-1]))
    return jnp.einsum(spec, a, w, preferred_element_type=acc_dtype)


def _source(xs, lengths, k: int, time_axis: int = 0):
    """Direction ``k``'s input sequence in scan order (the reverse one valid-reversed)."""
    return xs if k == 0 else _masking.reverse_valid(xs, lengths, time_axis)


def _sources(xs, lengths, num_dirs: int, time_axis: int = 0):
    """:func:`_source` of every direction."""
    return [_source(xs, lengths, k, time_axis) for k in range(num_dirs)]


def _project_one(src, w_ih_k, compute_dtype, acc_dtype):
    """``[x_r, x_z, x_n]``: ``(T, B, H)`` input projections of one direction, without bias.

    The bias is added where the projections are read (inside the loop's elementwise fusion),
    which saves a pass over these arrays.
    """
    hidden = w_ih_k.shape[-1] // 3
    return [
        _mm(src, w_ih_k[:, g * hidden : (g + 1) * hidden], compute_dtype, acc_dtype)
        for g in range(3)
    ]


def _projections(xs, w_ih, lengths, num_dirs: int, compute_dtype, acc_dtype, time_axis=0):
    """Per direction, :func:`_project_one` of its whole input sequence in scan order."""
    return [
        _project_one(src, w_ih[k], compute_dtype, acc_dtype)
        for k, src in enumerate(_sources(xs, lengths, num_dirs, time_axis))
    ]


def _gate_biases(bias_x, b_hn, num_dirs: int, hidden: int, acc_dtype):
    """Per direction ``(b_r, b_z, b_n, b_hn)`` as ``(H,)`` arrays in ``acc_dtype``, or ``None``."""
    out = []
    for k in range(num_dirs):
        bx = [None] * 3
        if bias_x is not None:
            bx = [bias_x[k, g * hidden : (g + 1) * hidden].astype(acc_dtype) for g in range(3)]
        out.append((*bx, None if b_hn is None else b_hn[k].astype(acc_dtype)))
    return out


def _plus(a, b):
    """``a + b`` for ``b`` an ``(H,)`` bias (or ``None``), broadcast explicitly."""
    return a if b is None else a + b.reshape((1,) * (a.ndim - 1) + b.shape)


def _gates(x_r, x_z, x_n, hp, h, biases):
    """``r, z, n, hn`` and the new state of the reset-after cell (``hp``: ``h @ W_g``)."""
    b_r, b_z, b_n, b_hn = biases
    r = _sigmoid(_plus(x_r + hp[0], b_r))
    z = _sigmoid(_plus(x_z + hp[1], b_z))
    hn = _plus(hp[2], b_hn)
    n = jnp.tanh(_plus(x_n, b_n) + r * hn)
    return r, z, n, hn, n + z * (h - n)


def _hidden_matmuls(hs, w, compute_dtype, transposed: bool = False):
    """``[hs[k] @ w[k]]`` for the ``K`` directions (``w``: ``(K, H, 3H)``; ``transposed``:
    ``(K, 3H, H)``, used as ``hs[k] @ w[k].T``).

    The forward loop runs two directions as one batched matmul over ``K``; the tangent loop
    (whose transpose is the backward loop) as separate matmuls. Measured on CPU, median ms,
    separate vs batched: forward B32 T128 2 layers 219 vs 181, B64 327 vs 310, B8 16 vs 11;
    forward+backward with a batched tangent loop 548 vs 561, 1025 vs 1094, 32 vs 36.
    """
    acc_dtype = hs[0].dtype
    spec = "bi,oi->bo" if transposed else "bi,io->bo"
    if len(hs) == 1 or transposed:
        return [_mm(h, w[k], compute_dtype, acc_dtype, spec) for k, h in enumerate(hs)]
    out = _mm(jnp.stack(hs), w, compute_dtype, acc_dtype, "kbi,kio->kbo")
    return [out[k] for k in range(len(hs))]


def _step(hs, x_t, m_t, w, biases, compute_dtype):
    """One time step of every direction: ``(new states, per-direction (r, z, n, hn))``.

    ``x_t[k]``: direction ``k``'s three ``(B, H)`` input projections; ``m_t``: ``bool[B, 1]``
    or ``None``. ``w[k]`` is direction ``k``'s whole ``(H, 3H)`` hidden kernel: one matmul
    per step whose output is sliced per gate (measured faster on CPU than three ``(H, H)``
    matmuls), while the input projections come in as separate per-gate arrays (slicing
    those inside the loop is slow).
    """
    hps = _hidden_matmuls(hs, w, compute_dtype)
    new, saved = [], []
    for k, h in enumerate(hs):
        hidden = h.shape[-1]
        hp = [hps[k][..., g * hidden : (g + 1) * hidden] for g in range(3)]
        *gates, h_new = _gates(*x_t[k], hp, h, biases[k])
        if m_t is not None:
            # Past a sequence's end its state is frozen, as with torch's PackedSequence.
            h_new = jnp.where(m_t, h_new, h)
        new.append(h_new)
        saved.append(tuple(gates))
    return tuple(new), tuple(saved)


def _forward_scan(xg, w, biases, h0, mask, static: _Static):
    """The time loop that also hands out its gates (for the derivative), time-major.

    Returns ``(h_last, (hs, gates))``: ``h_last[k]`` ``(B, H)``, the state after each
    sequence's last step (masked steps keep it); ``hs[k]`` ``(T, B, H)``, the state after
    every step; ``gates[k] = (r, z, n, hn)``, each ``(T, B, H)``, per direction.
    """

    def step(hs, inputs):
        new, gates = _step(hs, *inputs, w, biases, static.compute_dtype)
        return new, (new, gates)

    return jax.lax.scan(step, tuple(h0), (xg, mask), unroll=static.unroll)


class _Chunks:
    """Time chunks of a layer's tangent pass with ``remat``: which steps each chunk covers
    and reads (time-major).

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
            return _time_major(jnp.take(a, t, axis=axis), axis)
        idx = t if axis == 0 else t.T
        idx = idx.reshape(idx.shape + (1,) * (a.ndim - 2))
        return _time_major(jnp.take_along_axis(a, idx, axis=axis), axis)

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


def _time_major(a, time_axis: int):
    """``a`` with its time axis (0 or 1) moved to the front."""
    return jnp.swapaxes(a, 0, 1) if time_axis else a


def _divisor_near(steps: int, target: int) -> int:
    """A divisor of ``steps`` in ``[target, 2 * target]`` (no padding chunk), else ``target``."""
    if target >= steps:
        return steps
    for c in range(target, min(2 * target, steps) + 1):
        if steps % c == 0:
            return c
    return target


def _forward_chunk(steps: int, rows: int) -> int:
    """Time steps per chunk of :func:`_forward_chunked` (the forward pass of ``remat``), for
    ``rows`` = batch size times the number of directions.

    Tuned for speed: each chunk projects ~2048 rows or more (summed over the directions),
    while the chunk's projections stay a fraction of a long sequence's (fresh memory costs
    page faults on CPU). Counting both directions' rows halves a bidirectional chunk: its
    projections were the peak of the remat gradient (XLA temp of B32 T128 2-layer
    bidirectional: 44.2 -> 38.9 MiB, 54.3 -> 48.2 MiB with lengths, for a training step
    3-9% slower). ``max(rows, 1)``: an empty batch (B = 0, as torch allows) is one chunk.
    """
    return _divisor_near(steps, max(steps // 16, -(-2048 // max(rows, 1)), 16))


def _remat_chunk(steps: int, batch: int) -> int:
    """Time steps per chunk of the tangent (so the backward) pass with ``remat=True``.

    Tuned for memory: a chunk's temporaries (about a dozen ``(Tc, B, H)`` arrays per
    direction) stay below the saved states with ``Tc ~ T/32``, while its matmuls keep 256
    rows or more. Measured (B16 T512 H256, fwd+bwd): XLA temp 47.8 MiB at Tc = 128 (the
    forward pass's chunks at the time) vs 23.9 MiB at Tc = 16, for 238 vs 251 ms.
    """
    return _divisor_near(steps, max(steps // 32, -(-256 // max(batch, 1)), 1))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _layer_ra(static: _Static, xs, w_ih, bias_x, w_hh, b_hn, h0, lengths):
    """One reset-after layer, every direction: the states in scan order and the last ones.

    Args:
      static: unroll, remat, compute dtype, time axis.
      xs: ``(T, B, D)`` layer input (``(B, T, D)`` for ``static.time_axis=1``), zero at
        padded steps.
      w_ih: ``(K, D, 3H)``; bias_x: ``(K, 3H)`` (``b_ih`` plus the ``r, z`` part of ``b_hh``)
        or ``None``; w_hh: ``(K, H, 3H)``; b_hn: ``(K, H)`` or ``None``.
      h0: ``(K, B, H)`` in the accumulation dtype.
      lengths: ``int32[B]`` or ``None``.

    Returns:
      ``(hs, h_last)``: ``hs[k]`` ``(T, B, H)`` (``(B, T, H)``), direction ``k``'s state
      after every step (padded steps unspecified), and ``h_last[k]`` ``(B, H)``, its state
      after the sequence's last step (``h0[k]`` for length 0), in the accumulation dtype.
      ``h_last`` is the loop's final carry, not a read of ``hs``: so the caller's ``h_n``
      does not keep ``hs`` alive (XLA fused such a read into the stack's final
      concatenation, which kept every layer's states to the end of the program).
    """
    return _infer(static, xs, w_ih, bias_x, w_hh, b_hn, h0, lengths)


def _run_steps(
    static: _Static, carry, xg, start, stop, w, biases, lengths, n_in_states, origin=0,
    rows=None,
):  # fmt: skip
    """Steps ``[start, stop)`` of the loop that keeps no gates.

    ``carry = (hs, states)``: the current state per direction and the ``states[k]`` array the
    loop writes step ``t``'s state into (at ``t`` along ``static.time_axis``). ``xg[k]``:
    direction ``k``'s three input projections, step ``t`` at position ``t - origin``. With
    ``n_in_states`` the ``n`` gate's projection of step ``t`` is read from ``states[k]``
    instead (see :func:`_infer`). ``rows``: only the first ``rows`` sequences step (``hs``
    then holds those rows); ``None``: all of them. ``start``/``stop`` may be traced.
    """
    ax, cd = static.time_axis, static.compute_dtype

    def starts(a, t):
        """Where step ``t``'s rows begin in ``a``: one index dtype for the dynamic slices
        (int64 zeros under x64, int32 bounds)."""
        out = [jnp.int32(0)] * a.ndim
        out[ax] = jnp.asarray(t, jnp.int32)
        return out

    def at(a, j):
        if rows is None:
            return jax.lax.dynamic_index_in_dim(a, j, ax, False)
        sizes = [*a.shape[:ax], 1, *a.shape[ax + 1 :]]
        sizes[1 - ax] = rows
        return jax.lax.squeeze(jax.lax.dynamic_slice(a, starts(a, j), sizes), (ax,))

    def put(a, h, t):
        if rows is None:
            return jax.lax.dynamic_update_index_in_dim(a, h, t, ax)
        return jax.lax.dynamic_update_slice(a, jnp.expand_dims(h, ax), starts(a, t))

    alive = None if lengths is None else lengths[:rows]

    def step(t, carry):
        hs, states = carry
        i = t if isinstance(origin, int) and origin == 0 else t - origin
        x_t = [
            (at(g[0], i), at(g[1], i), at(st, t) if n_in_states else at(g[2], i))
            for g, st in zip(xg, states, strict=True)
        ]
        # In scan order both directions are valid for t < length (the reverse one reads a
        # valid-reversed input).
        m_t = None if alive is None else (t < alive)[:, None]
        hs, _ = _step(hs, x_t, m_t, w, biases, cd)
        states = tuple(put(st, h, t) for st, h in zip(states, hs, strict=True))
        return hs, states

    static_bounds = isinstance(start, int) and isinstance(stop, int)
    unroll = static.unroll if static_bounds else 1
    return jax.lax.fori_loop(start, stop, step, carry, unroll=unroll)


# The inference loop of a batch with lengths runs the rows sorted by length in up to this
# many phases, each over a static prefix of the rows (B, 3B/4, B/2, B/4) and only as long
# as a row of that prefix is still alive, as torch's PackedSequence shrinks its batch.
# Measured (B32 T128 2-layer bidirectional, lengths in [T/4, T], forward, interleaved
# medians): 191.1 ms unsorted vs 175.2 / 170.6 / 164.1 ms with 2 / 4 / 8 phases, for a
# compile time of 1.09 vs 1.84 / 2.50 / 3.45 s; all lengths T: 183.3 vs 178.7 / 180.7 /
# 183.6 ms (no cost). Two more runs, unsorted vs 2 / 3 / 4 phases: 197.4 vs 184.3 / 174.5 /
# 168.2 ms and 188.5 vs 179.3 / 177.5 / 171.6 ms. Four is the compromise. Projecting each
# row group's input only as far as its longest row was slower than projecting everything
# (its small matmuls and zero-filled buffers cost more than the skipped FLOPs).
_PHASES = 4


def _phase_bounds(batch: int, phases: int) -> list[int]:
    """``0 = b_0 < b_1 < ... < b_P = B``: the row prefixes ``[0, b_j)`` of the phases."""
    return sorted({round(j * batch / phases) for j in range(phases + 1)})


def _infer(static: _Static, xs, w_ih, bias_x, w_hh, b_hn, h0, lengths):
    """:func:`_layer_ra`'s forward computation (no gates kept), in ``static.time_axis``'s
    layout.

    The input projections of all steps come first; the loop then reads step ``t`` of them
    and writes the new state into the slot of the ``n`` gate's projection of step ``t``,
    which nothing reads again: that array leaves the loop as the states, so the output
    needs no buffer of its own. A batch-first input is read where it lies (time axis 1)
    and its output written batch-first, without transposing either.

    With ``lengths`` the rows run sorted by length, in phases (see ``_PHASES``), so that
    most padded steps are skipped; the states of skipped steps are left unwritten (the
    caller masks the output). Returns ``(states, h_last)`` as :func:`_layer_ra`.

    Measured (forward, interleaved medians of three runs, against the time-major loop over
    chunks of >= 2048 projected rows that it replaces): B64 T128 D256 H256 64.7 -> 58.6,
    67.1 -> 61.7, 91.2 -> 76.8 ms; B16 T512 72.9 -> 69.6, 79.5 -> 71.3, 75.9 -> 70.7 ms;
    B32 T128 2-layer bidirectional with lengths 172.3 -> 180.0, 182.4 -> 181.0, 179.1 ->
    175.8 ms (no clear change, before the phases).
    """
    ax = static.time_axis
    acc_dtype, cd = h0.dtype, static.compute_dtype
    num_dirs, hidden = w_hh.shape[0], w_hh.shape[1]
    steps, batch = xs.shape[ax], xs.shape[1 - ax]
    biases = _gate_biases(bias_x, b_hn, num_dirs, hidden, acc_dtype)
    w = w_hh.astype(cd)
    # Phases need traced loop bounds, which rule out unrolling.
    phased = lengths is not None and steps > 0 and batch > 0 and static.unroll == 1
    if phased:
        order = jnp.argsort(-lengths, stable=True)
        lengths = lengths[order]
        xs = jnp.take(xs, order, axis=1 - ax)
        h0 = jnp.take(h0, order, axis=1)
    xg = _projections(xs, w_ih, lengths, num_dirs, cd, acc_dtype, ax)
    hs, states = tuple(h0[k] for k in range(num_dirs)), tuple(g[2] for g in xg)
    if not phased:
        if steps:
            carry = (hs, states)
            hs, states = _run_steps(static, carry, xg, 0, steps, w, biases, lengths, True)
        return states, hs
    bounds = _phase_bounds(batch, min(_PHASES, batch))
    start = 0
    for lo, rows in reversed(list(itertools.pairwise(bounds))):
        # Rows [0, rows) step while row `lo` (the longest of those the next phase drops)
        # is alive; sorted lengths make the phases contiguous in time.
        stop = lengths[lo]
        carry = (tuple(h[:rows] for h in hs), states)
        sub, states = _run_steps(
            static, carry, xg, start, stop, w, biases, lengths, True, rows=rows
        )
        hs = tuple(jnp.concatenate([a, h[rows:]]) for a, h in zip(sub, hs, strict=True))
        start = stop
    unsort = jnp.argsort(order)
    return (
        tuple(jnp.take(st, unsort, axis=1 - ax) for st in states),
        tuple(jnp.take(h, unsort, axis=0) for h in hs),
    )


def _forward_chunked(static: _Static, xs, w_ih, bias_x, w_hh, b_hn, h0, lengths):
    """The forward pass of ``remat`` (no gates kept), in bounded memory: time-major states
    from an input in ``static.time_axis``'s layout (a batch-first input is read chunk by
    chunk where it lies).

    Unlike :func:`_infer`, which projects every step first, this projects chunk by chunk
    (see :func:`_forward_chunk`), so that the projections never exist for all steps at once
    and the remat backward's memory stays near the saved states (XLA temp of the B16 T512
    gradient, measured while the input was still transposed first: 23.9 MiB this way vs
    32.1 MiB with :func:`_infer`; 16.5 MiB now). The states are written in
    place into one ``(T, B, H)`` output; the reverse direction gathers each chunk's steps.
    Returns ``(states, h_last)``, the states time-major, as :func:`_layer_ra`.
    """
    ax, acc_dtype, cd = static.time_axis, h0.dtype, static.compute_dtype
    num_dirs, hidden = w_hh.shape[0], w_hh.shape[1]
    steps, batch = xs.shape[ax], xs.shape[1 - ax]
    w = w_hh.astype(cd)
    biases = _gate_biases(bias_x, b_hn, num_dirs, hidden, acc_dtype)
    carry = (
        tuple(h0[k] for k in range(num_dirs)),
        tuple(jnp.zeros((steps, batch, hidden), acc_dtype) for _ in range(num_dirs)),
    )
    if steps == 0:
        return carry[1], carry[0]
    chunk = _forward_chunk(steps, batch * num_dirs)
    chunks = _Chunks(steps, batch, chunk, lengths)
    tm = static._replace(time_axis=0)

    def run(carry, start, size: int):
        """Steps ``[start, start + size)``: project them, then loop over them."""
        # The reverse direction gathers its chunk's (valid-reversed) steps: no reversed copy
        # of the whole input.
        t = start + jnp.arange(size, dtype=jnp.int32)
        srcs = [_time_major(jax.lax.dynamic_slice_in_dim(xs, start, size, ax), ax)] + [
            chunks.gather(xs, chunks.src_steps(t, k), ax) for k in range(1, num_dirs)
        ]
        xg = [_project_one(src, w_ih[k], cd, acc_dtype) for k, src in enumerate(srcs)]
        return _run_steps(
            tm, carry, xg, start, start + size, w, biases, lengths, False, origin=start
        )

    full, tail = divmod(steps, chunk)
    if full == 1:
        carry = run(carry, 0, chunk)
    else:
        carry = jax.lax.fori_loop(0, full, lambda c, cr: run(cr, c * chunk, chunk), carry)
    if tail:
        carry = run(carry, full * chunk, tail)
    return carry[1], carry[0]


def _coefficients_of(r, z, n, hn, hprev, mask):
    """The tangent coefficients ``(c_g, c_f, c_h)`` of one direction over a stretch of
    ``T'`` steps, from its gates ``r, z, n, hn`` and previous states ``h_{t-1}``.

    With ``P = (1 - z)(1 - n^2)``: ``c_g = [c_r, c_z, c_n]`` ``(T', B, 3H)`` with
    ``c_r = P r (1 - r) hn``, ``c_z = z (1 - z)(h_{t-1} - n)``, ``c_n = P r``; ``c_f = P``
    and ``c_h = z`` ``(T', B, H)``. Where ``mask`` is False they are 0 (``c_h = 1``), so the
    tangent state is carried unchanged over padding.
    """
    acc_dtype = hprev.dtype
    one = jnp.ones((), acc_dtype)
    p = (one - z) * (one - n * n)
    c_n = p * r
    coef = [c_n * (one - r) * hn, z * (one - z) * (hprev - n), c_n, p]
    c_h = z
    if mask is not None:
        zero = jnp.zeros((), acc_dtype)
        coef = [jnp.where(mask, c, zero) for c in coef]
        c_h = jnp.where(mask, z, one)
    return jnp.concatenate(coef[:3], axis=-1), coef[3], c_h


def _is_zero(t) -> bool:
    return t is None or isinstance(t, jax.custom_derivatives.SymbolicZero)


def _sum(terms):
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


def _tangent_sources(static: _Static, coefs, srcs, dsrcs, hprevs, w_ih, tangents):
    """Per direction, ``s_t``: every tangent of ``h_t`` that does not go through ``dh_{t-1}``.

    ``tangents = (dw_ih, dbias_x, dw_hh, db_hn)`` (any may be a symbolic zero); ``dsrcs`` is
    ``None`` when the input has no tangent. Returns ``None`` for a direction without any.
    The matmuls use the whole ``(·, 3H)`` kernels, so that their transposes (the weight
    gradients) are single big matmuls.
    """
    dw_ih, dbias_x, dw_hh, db_hn = tangents
    cd = static.compute_dtype
    out = []
    for k, ((c_g, c_f, _), src, hprev) in enumerate(zip(coefs, srcs, hprevs, strict=True)):
        acc_dtype = hprev.dtype
        hidden = hprev.shape[-1]
        # Tangents of the input-side and hidden-side pre-activations, (T', B, 3H).
        x_part = _sum(
            [
                None if dsrcs is None else _mm(dsrcs[k], w_ih[k], cd, acc_dtype),
                None if _is_zero(dw_ih) else _mm(src, dw_ih[k], cd, acc_dtype),
            ]
        )
        if not _is_zero(dbias_x):
            x_part = _plus(x_part, dbias_x[k].astype(acc_dtype))
        h_part = None if _is_zero(dw_hh) else _mm(hprev, dw_hh[k], cd, acc_dtype)
        if not _is_zero(db_hn):
            zeros = jnp.zeros((2 * hidden,), acc_dtype)
            h_part = _plus(h_part, jnp.concatenate([zeros, db_hn[k].astype(acc_dtype)]))
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


def _gate_sum(a, gates: int):
    """``(..., G*H)`` -> ``(..., H)``: the sum over the ``G`` gate blocks."""
    return jnp.sum(a.reshape((*a.shape[:-1], gates, a.shape[-1] // gates)), axis=-2)


def _tangent_loop(static: _Static, w_hh, dh_init, sources, coefs):
    """``dh_t = s_t + sum_g c_g (dh_{t-1} @ W_g) + c_h dh_{t-1}``: the last ``dh`` and every
    ``dh_t``, per direction.

    One ``(B, H) @ (H, 3H)`` matmul per step and direction. Its kernel is given transposed,
    ``dh @ (W^T)^T``, so that the reverse-mode transpose of this loop (the backward pass) is
    a plain ``(B, 3H) @ (3H, H)`` matmul per step with no per-step transposition (measured
    faster on CPU than three ``(H, H)`` matmuls).
    """
    cd = static.compute_dtype
    num_dirs = len(dh_init)
    w_t = jnp.swapaxes(w_hh, 1, 2).astype(cd)
    sources = [
        jnp.zeros_like(c[1]) if s is None else s for s, c in zip(sources, coefs, strict=True)
    ]

    def step(dhs, inputs):
        s_t, c_t = inputs
        new = []
        hps = _hidden_matmuls(dhs, w_t, cd, transposed=True)
        for k in range(num_dirs):
            dh = dhs[k]
            c_g, _, c_h = c_t[k]
            new.append(s_t[k] + _gate_sum(c_g * hps[k], 3) + c_h * dh)
        new = tuple(new)
        return new, new

    return jax.lax.scan(step, tuple(dh_init), (sources, coefs), unroll=static.unroll)


@_layer_ra.defjvp
def _layer_ra_jvp(static: _Static, primals, tangents):
    if static.time_axis and not static.remat:
        # The derivative runs time-major (its scans and chunk gathers index time on axis 0):
        # a batch-first layer transposes its input and its states here, once each way. With
        # remat the chunks read a batch-first input where it lies instead: a transposed copy
        # would be kept for the backward pass (XLA temp of the B16 T512 remat gradient:
        # 23.9 MiB with the copy).
        xs, *rest = primals
        dxs, *drest = tangents
        xs, dxs = jnp.swapaxes(xs, 0, 1), jnp.swapaxes(dxs, 0, 1)
        (hs, h_last), (dhs, dh_last) = _layer_ra_jvp(
            static._replace(time_axis=0), (xs, *rest), (dxs, *drest)
        )
        swap = functools.partial(jnp.swapaxes, axis1=0, axis2=1)
        return (tuple(map(swap, hs)), h_last), (tuple(map(swap, dhs)), dh_last)

    xs, w_ih, bias_x, w_hh, b_hn, h0, lengths = primals
    dxs, dw_ih, dbias_x, dw_hh, db_hn, dh0, _ = tangents
    acc_dtype = h0.dtype
    num_dirs, hidden = w_hh.shape[0], w_hh.shape[1]
    ax = static.time_axis  # 1 only with remat: xs and dxs are batch-first, the rest not
    steps, batch = xs.shape[ax], xs.shape[1 - ax]
    mask = None if lengths is None else _masking.time_mask(lengths, steps)
    dh_init = tuple(
        jnp.zeros_like(h0[k]) if _is_zero(dh0) else dh0[k].astype(acc_dtype)
        for k in range(num_dirs)
    )
    weight_tangents = (dw_ih, dbias_x, dw_hh, db_hn)
    biases = _gate_biases(bias_x, b_hn, num_dirs, hidden, acc_dtype)
    cd = static.compute_dtype
    w = w_hh.astype(cd)

    def stretch(dh, h_start, src_of, m):
        """A stretch of steps (all of them, or one remat chunk) from the state before it:
        ``(states, last state, (last dh, every dh))``.

        ``src_of(a, k)`` reads direction ``k``'s steps of the input (or its tangent) ``a``
        in scan order. The forward loop hands out its gates, so the coefficients cost no
        matmul of their own.
        """
        srcs = [src_of(xs, k) for k in range(num_dirs)]
        xg = [_project_one(src, w_ih[k], cd, acc_dtype) for k, src in enumerate(srcs)]
        h_last, (states, gates) = _forward_scan(xg, w, biases, h_start, m, static)
        hprevs = [
            jnp.concatenate([h_start[k][None], states[k][:-1]], axis=0) for k in range(num_dirs)
        ]
        coefs = [_coefficients_of(*gates[k], hprevs[k], m) for k in range(num_dirs)]
        dsrcs = None if _is_zero(dxs) else [src_of(dxs, k) for k in range(num_dirs)]
        sources = _tangent_sources(static, coefs, srcs, dsrcs, hprevs, w_ih, weight_tangents)
        return states, h_last, _tangent_loop(static, w_hh, dh, sources, coefs)

    if not static.remat:
        hs, h_last, (dh_last, dhs) = stretch(dh_init, h0, lambda a, k: _source(a, lengths, k), mask)
        return (hs, h_last), (dhs, dh_last)

    # remat: the tangent (and so the backward) pass runs chunk by chunk, and each chunk
    # reruns the forward loop over its steps from the state before it, so that reverse mode
    # keeps only the primal inputs and one state per chunk, not the states of every step:
    # the states are the layer's output, whose cotangent the backward pass holds anyway.
    # The whole tangent computation is checkpointed, so the gates are recomputed in the
    # backward pass.
    hs, h_last = _forward_chunked(static, xs, w_ih, bias_x, w_hh, b_hn, h0, lengths)
    if not steps:  # nothing to rerun: empty states, and h_last is h0
        hs = tuple(_time_major(h, ax) for h in hs)
        return (hs, h_last), (tuple(jnp.zeros_like(h) for h in hs), dh_init)
    chunk = _remat_chunk(steps, batch)
    chunks = _Chunks(steps, batch, chunk, lengths)

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
    remat_step = jax.checkpoint(chunk_step, prevent_cse=False)
    # The tangent loop's final carry is dh_last: padded steps carry dh unchanged.
    dh_last, dhs = jax.lax.scan(remat_step, dh_init, (chunks.times, befores))
    dhs = tuple(chunks.unchunk(d) for d in dhs)
    hs = tuple(_time_major(h, ax) for h in hs)
    return (hs, h_last), (tuple(_time_major(d, ax) for d in dhs), dh_last)


def _layer(
    lp, xs, h0, mask, lengths, *, time_axis, reset_after, unroll, remat, compute_dtype,
    acc_dtype,
):  # fmt: skip
    """Runs one layer, all directions at once.

    Args:
      lp: the layer's params, ``w_ih (K, D, 3H)``, ``w_hh (K, H, 3H)``, biases ``(K, 3H)``.
      xs: ``(T, B, D)`` layer input (``(B, T, D)`` for ``time_axis=1``), zero at padded
        steps.
      h0: ``(K, B, H)`` initial states in ``acc_dtype``.
      mask: ``bool[T, B, 1]`` (``bool[B, T, 1]``) validity mask, or ``None`` when every
        sequence is full length.
      lengths: ``int32[B]`` or ``None``.
      time_axis: 0 or 1, the time axis of ``xs`` and of ``ys``.

    Returns:
      ``(ys, h_n)``: ``ys`` ``(T, B, K*H)`` (``(B, T, K*H)``) in ``acc_dtype``, zero at padded
      steps; ``h_n`` ``(K, B, H)``.
    """
    if not reset_after:
        # The Cho et al. variant runs time-major.
        swap = functools.partial(_time_major, time_axis=time_axis)  # its own inverse
        y, h_n = _layer_generic(
            lp, swap(xs), h0, None if mask is None else swap(mask), lengths,
            reset_after=reset_after, unroll=unroll, remat=remat, compute_dtype=compute_dtype,
            acc_dtype=acc_dtype,
        )  # fmt: skip
        return swap(y), h_n
    w_ih, w_hh = lp["w_ih"], lp["w_hh"]
    num_dirs, hidden = w_hh.shape[0], w_hh.shape[1]
    bias_x, b_hn = _split_bias(lp.get("b_ih"), lp.get("b_hh"), hidden, reset_after)
    static = _Static(int(unroll), bool(remat), jnp.dtype(compute_dtype), time_axis)
    # h_n is the state after scan step length - 1 in both directions (h0 for length 0).
    hs, h_last = _layer_ra(static, xs, w_ih, bias_x, w_hh, b_hn, h0, lengths)
    h_n = jnp.stack(h_last)
    if num_dirs == 1:
        y = hs[0]
    else:
        back = _masking.reverse_valid(hs[1], lengths, time_axis)
        y = jnp.concatenate([hs[0], back], axis=-1)
    if mask is not None:
        y = jnp.where(mask, y, jnp.zeros((), y.dtype))
    return y, h_n


# --------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------


def stack_dims(params: Params) -> tuple[int, int, int, int]:
    """Returns ``(L, K, D, H)`` of a stack params tree, checking that every layer agrees.

    Raises:
      ValueError: if the tree does not have the layout described in the module docstring.
    """
    if not isinstance(params, Mapping) or not params:
        raise ValueError("params must be a non-empty mapping {'layer_0': {...}, ...}")
    num_layers = len(params)
    expected = {f"layer_{i}" for i in range(num_layers)}
    if set(params) != expected:
        raise ValueError(
            f"params must have keys layer_0 .. layer_{num_layers - 1}; got {sorted(params)}"
        )
    num_dirs = hidden = in_features = None
    for i in range(num_layers):
        lp = params[f"layer_{i}"]
        name = f"params['layer_{i}']"
        _check_cell_params(lp, name)
        w_ih, w_hh = lp["w_ih"], lp["w_hh"]
        if w_hh.ndim != 3 or w_hh.shape[2] != 3 * w_hh.shape[1] or w_hh.shape[0] not in (1, 2):
            raise ValueError(
                f"{name}['w_hh'] must have shape (K, H, 3H), K in (1, 2); got {w_hh.shape}"
            )
        if i == 0:
            num_dirs, hidden = w_hh.shape[0], w_hh.shape[1]
            if w_ih.ndim != 3:
                raise ValueError(f"{name}['w_ih'] must have shape (K, D, 3H); got {w_ih.shape}")
            in_features = w_ih.shape[1]
        want_d = in_features if i == 0 else num_dirs * hidden
        checks = {
            "w_hh": (num_dirs, hidden, 3 * hidden),
            "w_ih": (num_dirs, want_d, 3 * hidden),
            "b_ih": (num_dirs, 3 * hidden),
            "b_hh": (num_dirs, 3 * hidden),
        }
        for key, shape in checks.items():
            if key in lp and lp[key].shape != shape:
                raise ValueError(f"{name}['{key}'] must have shape {shape}; got {lp[key].shape}")
    return num_layers, num_dirs, in_features, hidden


def gru(
    params: Params,
    x,
    h0=None,
    *,
    lengths=None,
    batch_first: bool = True,
    dropout: float = 0.0,
    key=None,
    reset_after: bool = True,
    unroll: int | None = None,
    remat: bool = False,
    dtype=None,
    checkify_lengths: bool = False,
) -> tuple[Array, Array]:
    r"""A multi-layer, optionally bidirectional GRU over whole sequences (``torch.nn.GRU``).

    Each layer applies the cell of :func:`gru_step` at every step, as one ``jax.lax.scan``.
    Layer ``l > 0`` takes as input the concatenated outputs of both directions of layer
    ``l - 1``; with ``dropout > 0`` and a ``key``, those outputs pass through inverted
    dropout (every layer but the last, as torch).

    Variable lengths follow ``torch.nn.utils.rnn.pack_padded_sequence``: for sequence ``b``
    only steps ``t < lengths[b]`` are computed; the forward direction's ``h_n`` is its state
    after step ``lengths[b] - 1`` (``h0`` when the length is 0), the reverse direction runs
    from ``lengths[b] - 1`` down to 0, and ``output`` is exactly zero at padded steps.

    Args:
      params: the stack params tree (see module docstring): ``L`` layers, ``K`` directions.
      x: ``(B, T, D)`` if ``batch_first`` else ``(T, B, D)``; unbatched ``(T, D)``.
        Floating point.
      h0: ``(L*K, B, H)`` initial states (``(L*K, H)`` for unbatched ``x``), index
        ``l*K + k`` for layer ``l``, direction ``k`` (1 = reverse). ``None``: zeros.
      lengths: integer array ``(B,)`` of valid lengths in ``[0, T]`` (a scalar for unbatched
        ``x``), or ``None`` for full-length sequences. Concrete values out of range raise;
        traced ones are clipped to ``[0, T]`` (see ``checkify_lengths``).
      batch_first: layout of ``x`` and ``output``. Note: the default ``True`` differs from
        torch's ``False``.
      dropout: drop probability in ``[0, 1)`` on each layer's output except the last.
      key: PRNG key for dropout. Dropout is applied only when a key is given; ``None`` means
        inference (deterministic).
      reset_after: ``True`` for torch/cuDNN's cell, ``False`` for Cho et al. (2014).
      unroll: unroll factor of the time loops; ``None``: :func:`default_unroll` of the
        platform the computation goes to (1 on the CPU, 8 on a GPU or TPU). With
        ``lengths``, inference skips most padded steps (rows sorted by length, in phases)
        only for ``unroll=1``.
      remat: recompute each step in the backward pass instead of storing its activations
        (memory ``O(T*B*H)`` per layer).
      dtype: dtype of the matmul inputs (e.g. ``jnp.bfloat16``); the carry, gates and
        accumulation stay in float32 (float64 for float64 inputs). ``None``: the promoted
        dtype of ``x`` and the parameters.
      checkify_lengths: add a ``jax.experimental.checkify`` check that traced ``lengths`` lie
        in ``[0, T]``; functionalize it with ``checkify.checkify`` to raise.

    Returns:
      ``(output, h_n)``: ``output`` ``(B, T, K*H)`` (``(T, B, K*H)`` if not ``batch_first``,
      ``(T, K*H)`` unbatched) and ``h_n`` ``(L*K, B, H)`` (``(L*K, H)`` unbatched), both in
      the dtype of ``x``.

    Raises:
      ValueError: wrong rank or feature size of ``x``, wrong ``h0`` or ``lengths`` shape,
        concrete ``lengths`` outside ``[0, T]``, ``dropout`` outside ``[0, 1)``, ``unroll``
        not a positive integer or ``None``, a malformed params tree.
      TypeError: non-floating ``x``/``h0``, non-integer ``lengths``.
    """
    num_layers, num_dirs, in_features, hidden = stack_dims(params)
    unroll = _check_unroll(unroll)
    x = jnp.asarray(x)
    _check_float("x", x)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout}")
    if x.ndim not in (2, 3):
        layout = "(B, T, D)" if batch_first else "(T, B, D)"
        raise ValueError(
            f"x must have shape {layout} or unbatched (T, D); got rank {x.ndim}, shape {x.shape}"
        )
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x must have {in_features} features (last axis) to match params; got shape {x.shape}"
        )
    unbatched = x.ndim == 2
    # Every layer works in x's own layout: batch-first input is read, and the output
    # written, without a transposition (the derivative transposes per layer, see
    # _layer_ra_jvp).
    axis = 1 if batch_first and not unbatched else 0
    xs = x[:, None, :] if unbatched else x
    steps, batch = xs.shape[axis], xs.shape[1 - axis]

    weights_dtype = params["layer_0"]["w_ih"].dtype
    compute_dtype, acc_dtype = _dtypes(x.dtype, weights_dtype, dtype)

    states = num_layers * num_dirs
    if h0 is None:
        h0 = jnp.zeros((states, batch, hidden), acc_dtype)
    else:
        h0 = jnp.asarray(h0)
        _check_float("h0", h0)
        want = (states, hidden) if unbatched else (states, batch, hidden)
        if h0.shape != want:
            raise ValueError(
                f"h0 must have shape (L*K, {'H' if unbatched else 'B, H'}) = {want}; got {h0.shape}"
            )
        h0 = (h0[:, None, :] if unbatched else h0).astype(acc_dtype)

    if lengths is not None:
        if unbatched:
            lengths = jnp.reshape(jnp.asarray(lengths), (1,)) if jnp.ndim(lengths) == 0 else lengths
        lengths = _masking.prepare_lengths(lengths, batch, steps, checkify_lengths=checkify_lengths)
        mask = _masking.time_mask(lengths, steps, axis)
        # Padding is never read, not even by the backward pass (0 * NaN would leak).
        xs = jnp.where(mask, xs, jnp.zeros((), xs.dtype))
    else:
        mask = None

    drop_keys = None
    if dropout > 0.0 and key is not None and num_layers > 1:
        drop_keys = jax.random.split(key, num_layers - 1)

    run = functools.partial(
        _layer,
        time_axis=axis,
        mask=mask,
        lengths=lengths,
        reset_after=reset_after,
        unroll=unroll,
        remat=remat,
        compute_dtype=compute_dtype,
        acc_dtype=acc_dtype,
    )

    def drop(y, key):
        """Inverted dropout on a layer's output, the mask drawn time-major ``(T, B, K*H)``
        whatever the layout (the same mask for the same key in either layout)."""
        if key is None:
            return y
        shape = (y.shape[1], y.shape[0], y.shape[2]) if axis else y.shape
        keep = jax.random.bernoulli(key, 1.0 - dropout, shape)
        keep = _time_major(keep, axis)
        return jnp.where(keep, y / (1.0 - dropout), jnp.zeros((), y.dtype))

    def h0_of(i):
        return h0[i * num_dirs : (i + 1) * num_dirs]

    layer_in, first_h = run(params["layer_0"], xs, h0_of(0))
    finals = [first_h]
    rest = [params[f"layer_{i}"] for i in range(1, num_layers)]
    if len(rest) >= 2 and _same_structure(rest):
        # Layers 1..L-1 have identical shapes: one lax.scan over them compiles the layer once,
        # so compile time stays flat in num_layers.
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *rest)
        h0_rest = h0[num_dirs:].reshape(num_layers - 1, num_dirs, *h0.shape[1:])
        keys = None if drop_keys is None else drop_keys

        def body(y, inputs):
            lp, h0_l, key_l = inputs
            return run(lp, drop(y, key_l), h0_l)

        layer_in, h_rest = jax.lax.scan(body, layer_in, (stacked, h0_rest, keys))
        finals.append(h_rest.reshape(-1, *h_rest.shape[2:]))
    else:
        for i, lp in enumerate(rest, start=1):
            key_i = None if drop_keys is None else drop_keys[i - 1]
            layer_in, h_n = run(lp, drop(layer_in, key_i), h0_of(i))
            finals.append(h_n)

    out = layer_in.astype(x.dtype)
    h_n = jnp.concatenate(finals, axis=0).astype(x.dtype)
    if unbatched:
        return out[:, 0], h_n[:, 0]
    return out, h_n


def _same_structure(layers) -> bool:
    """Whether the layers' params trees have the same keys, shapes and dtypes (stackable)."""
    first = jax.tree.map(lambda a: (a.shape, a.dtype), layers[0])
    return all(jax.tree.map(lambda a: (a.shape, a.dtype), lp) == first for lp in layers[1:])


def cell_of(params: Params, layer: int = 0, direction: int = 0) -> dict[str, Any]:
    """Extracts one cell's params (``w_ih (D, 3H)``, ...) from a stack params tree."""
    return {k: v[direction] for k, v in params[f"layer_{layer}"].items()}
