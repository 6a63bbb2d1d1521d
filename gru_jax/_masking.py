"""Variable-length helpers: validity masks and valid-prefix reversal.

Shape legend: B = batch size, T = time steps, F = any trailing feature dims.

Arrays are time-major, ``(T, B, ...)``, unless a ``time_axis=1`` argument says they are
batch-major, ``(B, T, ...)`` (the layout of a batch-first input, which the inference loop
reads without transposing it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


def concrete_or_none(x):
    """Returns ``x`` as a NumPy array if its value is known at trace time, else ``None``."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def prepare_lengths(
    lengths, batch: int, steps: int, *, checkify_lengths: bool = False, hint: str = ""
):
    """Validates ``lengths`` and returns it as an ``int32`` array of shape ``(B,)``.

    Args:
      lengths: integer array of shape ``(B,)``; values must lie in ``[0, T]``.
      batch: ``B``, the batch size of the input.
      steps: ``T``, the number of time steps of the input.
      checkify_lengths: if True, add a :mod:`jax.experimental.checkify` check that the
        values lie in ``[0, T]``; it raises when the caller wraps the function with
        ``checkify.checkify`` and calls ``.throw()`` on the error.
      hint: appended to the shape error (say, why the caller's layout may explain it).

    Returns:
      ``int32[B]``. Concrete values outside ``[0, T]`` raise ``ValueError``; traced values
      (under ``jit``) cannot be checked at trace time and are clipped to ``[0, T]``.

    Raises:
      TypeError: if ``lengths`` is not an integer array.
      ValueError: if its shape is not ``(B,)`` or a concrete value is outside ``[0, T]``.
    """
    lengths_arr = jnp.asarray(lengths) if not isinstance(lengths, jax.Array) else lengths
    if not jnp.issubdtype(lengths_arr.dtype, jnp.integer):
        raise TypeError(
            f"lengths must be an integer array of shape ({batch},); got dtype {lengths_arr.dtype}"
        )
    if lengths_arr.shape != (batch,):
        raise ValueError(
            f"lengths must have shape (B,) = ({batch},) to match x; got shape "
            f"{lengths_arr.shape}{hint}"
        )
    concrete = concrete_or_none(lengths)
    if concrete is not None and concrete.size and (concrete.min() < 0 or concrete.max() > steps):
        bad = concrete[(concrete < 0) | (concrete > steps)]
        raise ValueError(
            f"lengths must lie in [0, T] = [0, {steps}]; got out-of-range values {bad.tolist()}"
        )
    lengths_arr = lengths_arr.astype(jnp.int32)
    if checkify_lengths:
        checkify.check(
            jnp.all((lengths_arr >= 0) & (lengths_arr <= steps)),
            f"lengths must lie in [0, T] = [0, {steps}]; got {{lengths}}",
            lengths=lengths_arr,
        )
    return jnp.clip(lengths_arr, 0, steps)


def time_mask(lengths, steps: int, time_axis: int = 0):
    """``bool[T, B, 1]`` (``bool[B, T, 1]`` for ``time_axis=1``): True where step ``t`` is
    inside sequence ``b`` (``t < lengths[b]``)."""
    t = jnp.arange(steps, dtype=jnp.int32)
    if time_axis:
        return (t[None, :] < lengths[:, None])[..., None]
    return (t[:, None] < lengths[None, :])[..., None]


def reverse_valid(x, lengths=None, time_axis: int = 0):
    """Reverses each sequence along time within its valid prefix; padding stays in place.

    For sequence ``b`` with length ``n``, position ``t < n`` receives ``x[n - 1 - t]`` and
    positions ``t >= n`` are left where they are. The map is its own inverse, so the same
    call puts a reverse-direction output back in forward order.

    Args:
      x: ``(T, B, *F)``, or ``(B, T, *F)`` for ``time_axis=1``.
      lengths: ``int32[B]`` or ``None`` (every sequence is full length: a plain flip).
      time_axis: the time axis of ``x``, 0 or 1.

    Returns:
      An array with the shape and dtype of ``x``.
    """
    if lengths is None:
        return jnp.flip(x, axis=time_axis)
    steps = x.shape[time_axis]
    t = jnp.arange(steps, dtype=jnp.int32)[:, None]
    idx = jnp.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)
    if time_axis:
        idx = idx.T
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=time_axis)
