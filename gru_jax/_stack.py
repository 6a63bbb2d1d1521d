r"""The stack: :func:`gru`, layers over layers, directions, dropout, ``h0`` and ``h_n``.

:func:`gru` checks its arguments (at trace time, with messages that name the argument) and
calls one jitted function per static configuration (:func:`_stack`): an eager call compiles
once per configuration and shape. Inside a transformation (a user's ``jit``, ``grad``,
``vmap``) the layers are traced where they stand instead (:func:`_layers`).

This module imports jax and :mod:`gru_jax._params`, :mod:`gru_jax._cell`,
:mod:`gru_jax._loops`, :mod:`gru_jax._dispatch`, :mod:`gru_jax._masking`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gru_jax import _cell, _dispatch, _loops, _masking, _params

Array = jax.Array


class _Config(NamedTuple):
    """The static part of a :func:`gru` call: the key of its compilation cache."""

    time_axis: int  # of the input and output: 1 batch-first, 0 time-major (or unbatched)
    unbatched: bool
    dropout: float
    reset_after: bool
    unroll: int | None  # None: each platform's default, chosen where it is compiled
    remat: bool
    compute_dtype: Any
    acc_dtype: Any
    impl: str
    interpret_kernel: str  # the Pallas kernel the CPU interprets (see _dispatch)


def gru(
    params,
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
    impl: str = "auto",
) -> tuple[Array, Array]:
    r"""A multi-layer, optionally bidirectional GRU over whole sequences (``torch.nn.GRU``).

    Each layer applies the cell of :func:`gru_jax.gru_step` at every step, in one time loop
    per layer. Layer ``l > 0`` takes as input the concatenated outputs of both directions of
    layer ``l - 1``; with ``dropout > 0`` and a ``key``, those outputs pass through inverted
    dropout (every layer but the last, as torch).

    Variable lengths follow ``torch.nn.utils.rnn.pack_padded_sequence``: for sequence ``b``
    only steps ``t < lengths[b]`` are computed; the forward direction's ``h_n`` is its state
    after step ``lengths[b] - 1`` (``h0`` when the length is 0), the reverse direction runs
    from ``lengths[b] - 1`` down to 0, and ``output`` is exactly zero at padded steps.

    The computation is compiled once per static configuration and shape, also when called
    outside ``jit``; inside a ``jit`` it is inlined.

    Args:
      params: the stack params tree (see :mod:`gru_jax._params`): ``L`` layers, ``K``
        directions.
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
      unroll: unroll factor of the time loops; ``None``: :func:`gru_jax.default_unroll` of
        the platform the computation goes to (1 on the CPU, 8 on a GPU or TPU). With
        ``lengths``, inference skips most padded steps (rows sorted by length, in phases)
        only for ``unroll=1``.
      remat: recompute each step in the backward pass instead of storing its activations
        (memory ``O(T*B*H)`` per layer). With ``impl="pallas"`` it changes nothing: that
        backward already keeps only the states and recomputes each step's gates.
      dtype: dtype of the matmul inputs (e.g. ``jnp.bfloat16``); the carry, gates and
        accumulation stay in float32 (float64 for float64 inputs). ``None``: the promoted
        dtype of ``x`` and the parameters.
      checkify_lengths: add a ``jax.experimental.checkify`` check that traced ``lengths`` lie
        in ``[0, T]``; functionalize it with ``checkify.checkify`` to raise.
      impl: the time loops: ``"xla"`` (``lax`` loops), ``"pallas"`` (one fused Pallas kernel
        per layer; interpret mode on the CPU; reverse-mode AD only) or ``"auto"`` (the
        default: ``"xla"`` until a measurement shows the kernel faster).

    Returns:
      ``(output, h_n)``: ``output`` ``(B, T, K*H)`` (``(T, B, K*H)`` if not ``batch_first``,
      ``(T, K*H)`` unbatched) and ``h_n`` ``(L*K, B, H)`` (``(L*K, H)`` unbatched), both in
      the dtype of ``x``.

    Raises:
      ValueError: wrong rank or feature size of ``x``, wrong ``h0`` or ``lengths`` shape,
        concrete ``lengths`` outside ``[0, T]``, ``dropout`` outside ``[0, 1)``, ``unroll``
        not a positive integer or ``None``, an unknown ``impl``, a malformed params tree.
      TypeError: non-floating ``x``/``h0``, non-integer ``lengths``.

    Example::

      >>> import jax, jax.numpy as jnp, gru_jax
      >>> params = gru_jax.init_gru(jax.random.key(0), 3, 4, num_layers=2, bidirectional=True)
      >>> out, h_n = gru_jax.gru(params, jnp.ones((2, 5, 3)), lengths=jnp.array([5, 2]))
      >>> out.shape, h_n.shape
      ((2, 5, 8), (4, 2, 4))
    """
    num_layers, num_dirs, in_features, hidden = _params.stack_dims(params)
    unroll = _loops.check_unroll(unroll)
    impl = _dispatch.check_impl(impl)
    x = jnp.asarray(x)
    _cell.check_float("x", x)
    check_dropout(dropout)
    _check_x_shape(x, in_features, batch_first)
    unbatched = x.ndim == 2
    # Every layer works in x's own layout: a batch-first input is read, and the output
    # written, without a transposition.
    axis = 1 if batch_first and not unbatched else 0
    steps, batch = (x.shape[0], 1) if unbatched else (x.shape[axis], x.shape[1 - axis])
    compute_dtype, acc_dtype = _cell.compute_dtypes(x.dtype, params["layer_0"]["w_ih"].dtype, dtype)
    if h0 is not None:
        want = (
            (num_layers * num_dirs, hidden) if unbatched else (num_layers * num_dirs, batch, hidden)
        )
        h0 = _check_h0(jnp.asarray(h0), want, x, batch_first)
    if lengths is not None:
        if unbatched and jnp.ndim(lengths) == 0:
            lengths = jnp.reshape(jnp.asarray(lengths), (1,))
        got = jnp.shape(lengths)[0] if jnp.ndim(lengths) == 1 else None
        lengths = _masking.prepare_lengths(
            lengths, batch, steps, checkify_lengths=checkify_lengths,
            hint=_layout_hint(x, batch_first, got),
        )  # fmt: skip
    if not (dropout > 0.0 and num_layers > 1):
        key = None
    config = _Config(
        axis, unbatched, float(dropout), bool(reset_after), unroll, bool(remat),
        compute_dtype, acc_dtype, impl, _dispatch.current_interpret_kernel(),
    )  # fmt: skip
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((params, x, h0, lengths, key))):
        # Inside a transformation the stack is traced where it stands: the jit of an eager
        # call would stage it first, and under differentiation that traces the layers'
        # inference loops for nothing (the derivative runs its own).
        return _layers(config, params, x, h0, lengths, key)
    return _stack(config, params, x, h0, lengths, key)


def _check_x_shape(x, in_features: int, batch_first: bool) -> None:
    """Raises ``ValueError`` unless ``x`` is ``(B, T, D)``/``(T, B, D)`` or ``(T, D)`` with
    ``D = in_features``, with a hint where its shape suggests the mistake."""
    if x.ndim not in (2, 3):
        layout = "(B, T, D)" if batch_first else "(T, B, D)"
        raise ValueError(
            f"x must have shape {layout} or unbatched (T, D); got rank {x.ndim}, shape {x.shape}"
        )
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x must have {in_features} features (last axis) to match params; got shape "
            f"{x.shape}" + _feature_hint(x, in_features)
        )


def _check_h0(h0, want: tuple, x, batch_first: bool):
    """``h0`` if it is floating point of shape ``want``, else ``TypeError``/``ValueError``."""
    _cell.check_float("h0", h0)
    if h0.shape != want:
        got = h0.shape[1] if h0.ndim == 3 else None
        raise ValueError(
            f"h0 must have shape (L*K, {'H' if len(want) == 2 else 'B, H'}) = {want}; got "
            f"{h0.shape}" + _layout_hint(x, batch_first, got)
        )
    return h0


def _feature_hint(x, in_features: int) -> str:
    """Why ``x``'s last axis may not be the features, when its shape suggests it."""
    if x.ndim == 2:
        return (
            "; a rank-2 x is one unbatched sequence (T, D): a batch of sequences of "
            "scalars (B, T) needs a feature axis, x[..., None]"
        )
    if in_features in x.shape[:-1]:
        return f"; the features (here {in_features}) must be on the last axis"
    return ""


def _layout_hint(x, batch_first: bool, got) -> str:
    """A ``batch_first`` hint for a batch-size mismatch that the swapped layout explains."""
    if x.ndim != 3 or got is None:
        return ""
    other = x.shape[1] if batch_first else x.shape[0]
    if got != other:
        return ""
    read, swapped = ("(B, T, D)", "(T, B, D)") if batch_first else ("(T, B, D)", "(B, T, D)")
    return (
        f"; x {x.shape} is read as {read} because batch_first={batch_first}: if it is "
        f"{swapped}, pass batch_first={not batch_first}"
    )


def check_dropout(dropout) -> None:
    """Raises ``ValueError`` unless ``dropout`` is a probability in ``[0, 1)``."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout}")


def _layers(config: _Config, params, x, h0, lengths, key):
    """:func:`gru` on checked arguments: the layers, each a call of the loop dispatcher."""
    num_layers, num_dirs = len(params), params["layer_0"]["w_hh"].shape[0]
    hidden, axis = params["layer_0"]["w_hh"].shape[1], config.time_axis
    xs = x[:, None, :] if config.unbatched else x
    batch = xs.shape[1 - axis]
    if h0 is None:
        h0 = jnp.zeros((num_layers * num_dirs, batch, hidden), config.acc_dtype)
    else:
        h0 = (h0[:, None, :] if config.unbatched else h0).astype(config.acc_dtype)
    if lengths is not None:
        # Padding is never read, not even by the backward pass (0 * NaN would leak).
        mask = _masking.time_mask(lengths, xs.shape[axis], axis)
        xs = jnp.where(mask, xs, jnp.zeros((), xs.dtype))
    keys = None if key is None else jax.random.split(key, num_layers - 1)
    run = functools.partial(
        _dispatch.run_layer, lengths=lengths, time_axis=axis, reset_after=config.reset_after,
        unroll=config.unroll, remat=config.remat, compute_dtype=config.compute_dtype,
        impl=config.impl, interpret_kernel=config.interpret_kernel,
    )  # fmt: skip
    y, h_first = run(params["layer_0"], xs, h0[:num_dirs])
    finals = [h_first]
    # Layers 1.. run as lax.scans over groups of layers with identical shapes (all of them,
    # but for a stack with mixed biases or dtypes), so that compile time stays flat in L.
    first = 1
    for group in _groups([params[f"layer_{i}"] for i in range(1, num_layers)]):
        last = first + len(group)
        inputs = (
            jax.tree.map(lambda *a: jnp.stack(a), *group),
            h0[first * num_dirs : last * num_dirs].reshape(len(group), num_dirs, *h0.shape[1:]),
            None if keys is None else keys[first - 1 : last - 1],
        )
        body = functools.partial(_next_layer, run, config)
        if len(group) == 1:  # a scan of one step only costs compile time
            y, h_group = body(y, jax.tree.map(lambda a: a[0], inputs))
            h_group = h_group[None]
        else:
            y, h_group = jax.lax.scan(body, y, inputs)
        finals.append(h_group.reshape(len(group) * num_dirs, *h_group.shape[2:]))
        first = last
    out = y.astype(x.dtype)
    h_n = jnp.concatenate(finals, axis=0).astype(x.dtype)
    if config.unbatched:
        return out[:, 0], h_n[:, 0]
    return out, h_n


# Eager calls compile once per configuration and shape.
_stack = jax.jit(_layers, static_argnums=0)


def _next_layer(run, config: _Config, y, inputs):
    """A layer after the first: dropout on the previous layer's output, then the layer."""
    lp, h0, key = inputs
    if key is not None:
        y = _dropout(y, key, config.dropout, config.time_axis)
    return run(lp, y, h0)


def _dropout(y, key, rate: float, time_axis: int):
    """Inverted dropout on a layer's output, the mask drawn time-major ``(T, B, K*H)``
    whatever the layout (the same mask for the same key in either layout)."""
    shape = (y.shape[1], y.shape[0], y.shape[2]) if time_axis else y.shape
    keep = _loops.time_major(jax.random.bernoulli(key, 1.0 - rate, shape), time_axis)
    return jnp.where(keep, y / (1.0 - rate), jnp.zeros((), y.dtype))


def _groups(layers) -> list[list]:
    """``layers`` cut into runs of consecutive layers with the same structure."""
    groups = []
    for lp in layers:
        if groups and _params.same_structure([groups[-1][0], lp]):
            groups[-1].append(lp)
        else:
            groups.append([lp])
    return groups
