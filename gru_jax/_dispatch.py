"""One layer over time: the one place that names the strategies, and the rule that picks one.

Every strategy has the contract of :mod:`gru_jax._loops`: ``layer(lp, xs, h0, lengths,
opts) -> (ys, h_n)``. They are:

* ``"xla"``: :func:`gru_jax._xla.layer`, the reset-after loops that keep no gates, with the
  custom JVP of :mod:`gru_jax._derivative`;
* ``"scan"``: :func:`gru_jax._scan.layer`, a plain ``lax.scan`` that JAX differentiates;
* ``"pallas"``: :func:`gru_jax._pallas.layer`, one fused Pallas kernel per layer and pass.

The rule (:func:`strategy`), for the platform the layer is compiled for:

1. ``impl="pallas"``: the Pallas kernel, lowered for that platform (Triton on a GPU,
   Mosaic on a TPU, interpreted on the CPU). It needs concrete shapes: with a symbolic
   batch or time (``jax.export``) it raises ``ValueError``.
2. ``impl="auto"``: a platform in :data:`PALLAS_FASTER_ON` takes the kernel (none does: no
   recorded measurement shows it faster yet); every other takes ``"xla"``.
3. ``impl="xla"`` (or ``"auto"`` otherwise): ``"xla"`` for the reset-after cell, ``"scan"``
   for ``reset_after=False``, whose matmul after the reset gate leaves no room for the
   tricks of ``"xla"``.

Platform choices: the strategy is chosen per platform with ``jax.lax.platform_dependent``
where the rule gives platforms different ones (with :data:`PALLAS_FASTER_ON` empty, it does
not). ``unroll=None`` is :func:`gru_jax.default_unroll` of the platform each loop is
compiled for (1 on the CPU, with inference's phases; 8 elsewhere), chosen loop by loop
(:func:`gru_jax._loops.unrolled`), so that a CPU host exporting for ``cuda`` gets the
accelerator's loops at the cost of a second trace of one step. With symbolic shapes the
XLA loops run at ``unroll=1`` and without phases, whose trip counts and row prefixes need
concrete sizes; the program is then the same on every platform.

This module imports jax and :mod:`gru_jax._loops`, :mod:`gru_jax._xla`,
:mod:`gru_jax._scan`, :mod:`gru_jax._pallas`.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools

import jax

from gru_jax import _loops, _pallas, _scan, _xla


class Impl(enum.StrEnum):
    """The values of ``impl``: what a user may ask for."""

    AUTO = "auto"
    XLA = "xla"
    PALLAS = "pallas"


IMPLS = tuple(i.value for i in Impl)

# The strategies by name: every one has the signature layer(lp, xs, h0, lengths, opts).
STRATEGIES: dict[str, _loops.Strategy] = {
    "xla": _xla.layer,
    "scan": _scan.layer,
    "pallas": _pallas.layer,
}

# The platforms where recorded measurements show the Pallas kernel faster than the XLA
# loops, so that impl="auto" picks it there (see the performance docs): none yet.
PALLAS_FASTER_ON: frozenset[str] = frozenset()

# The platforms a layer may be compiled for, each with its branch in platform_dependent.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

_interpret_kernel = contextvars.ContextVar("interpret_kernel", default="gpu")


def check_impl(impl: str) -> str:
    """``impl`` if it is one of :data:`IMPLS`, else ``ValueError``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    return Impl(impl).value


def strategy(impl: str, reset_after: bool, platform: str) -> str:
    """The name of the strategy that runs a layer compiled for ``platform`` (the rule)."""
    if impl == Impl.PALLAS or (impl == Impl.AUTO and platform in PALLAS_FASTER_ON):
        return "pallas"
    return "xla" if reset_after else "scan"


@contextlib.contextmanager
def interpret_kernel(kind: str):
    """Within the block, ``impl="pallas"`` on the CPU interprets the ``kind`` (``"gpu"`` or
    ``"tpu"``) kernel: the tests of the TPU kernel's numbers (TPU interpret mode)."""
    token = _interpret_kernel.set(kind)
    try:
        yield
    finally:
        _interpret_kernel.reset(token)


def current_interpret_kernel() -> str:
    """The kernel that ``impl="pallas"`` interprets on the CPU here (see
    :func:`interpret_kernel`): part of :func:`gru_jax.gru`'s static configuration."""
    return _interpret_kernel.get()


def run_layer(
    lp, xs, h0, *, lengths, time_axis: int, reset_after: bool, unroll: int | None, remat: bool,
    compute_dtype, impl: str = "auto", interpret_kernel: str = "gpu",
):  # fmt: skip
    """Runs one layer, all directions at once, by the strategy the rule picks.

    Args:
      lp: the layer's params, ``w_ih (K, D, 3H)``, ``w_hh (K, H, 3H)``, biases ``(K, 3H)``.
      xs: ``(T, B, D)`` layer input (``(B, T, D)`` for ``time_axis=1``), zero at padded
        steps.
      h0: ``(K, B, H)`` initial states in the accumulation dtype.
      lengths: ``int32[B]`` in ``[0, T]``, or ``None`` when every sequence is full length:
        the only masking input.
      time_axis: 0 or 1, the time axis of ``xs`` and of the output.
      reset_after, unroll, remat, compute_dtype, impl: as :func:`gru_jax.gru`.
      interpret_kernel: which Pallas kernel the CPU interprets (see
        :func:`interpret_kernel`).

    Returns:
      ``(ys, h_n)``: ``ys`` ``(T, B, K*H)`` (``(B, T, K*H)``) in the accumulation dtype,
      zero at padded steps; ``h_n`` ``(K, B, H)``, each direction's state after its last
      valid step.

    Raises:
      ValueError: ``impl="pallas"`` with a symbolic batch size or time.
    """
    static = all(isinstance(d, int) for d in xs.shape)
    if impl == Impl.PALLAS and not static:
        raise ValueError(
            f'impl="pallas" needs concrete batch and time sizes; got the symbolic input shape '
            f'{xs.shape}: use impl="xla" or impl="auto" to export with symbolic shapes'
        )
    options = functools.partial(
        _loops.Options, remat=bool(remat), time_axis=time_axis, reset_after=bool(reset_after),
        interpret_kernel=interpret_kernel,
    )  # fmt: skip

    branches, per_platform = {}, {}
    for platform in PLATFORMS:
        name = strategy(impl, reset_after, platform)
        # Symbolic shapes: a loop unrolled by k needs T // k at trace time (pallas refused
        # them above). Otherwise each loop resolves unroll=None for the platform it is
        # compiled for (_loops.unrolled).
        u = unroll if static else 1
        opts = options(unroll=u, compute_dtype=compute_dtype, phases=static)
        # One callable per distinct branch: platform_dependent traces each once.
        per_platform[platform] = branches.setdefault(
            (name, opts), functools.partial(STRATEGIES[name], opts=opts)
        )
    if len(branches) == 1:
        return per_platform["cpu"](lp, xs, h0, lengths)
    return jax.lax.platform_dependent(lp, xs, h0, lengths, **per_platform)
