"""Each kernel launch lowered for the platform it is compiled for.

A ``pallas_call`` is fixed to one lowering when it is traced: Triton, Mosaic TPU, or the
interpreter. A program traced on one platform and compiled for another (``jax.export`` from
a CPU host for ``cuda`` or ``tpu``), or for several at once, needs the choice made where it
is lowered instead. :func:`launch` binds a primitive whose lowering rule is registered once
per platform; each rule traces the launch its platform runs:

* ``cuda``, ``rocm``: the GPU kernel through Triton (:mod:`gru_jax._pallas_kernel`);
* ``tpu``: the TPU kernel through Mosaic (:mod:`gru_jax._pallas_tpu`);
* ``cpu``: the GPU kernel in Pallas's interpret mode, with a one-time warning that this is
  for tests, not for speed.

The TPU kernel in Pallas's TPU interpret mode (``Spec.cpu_kernel="tpu"``, for tests on the
CPU) is chosen where the program is traced instead: that mode runs through ordered
callbacks, which a lowering rule cannot emit.

A multi-platform lowering (``jax.export(..., platforms=["cpu", "cuda", "tpu"])``) emits one
branch per platform, each lowered by its own rule, so every platform gets its own kernel.
The unroll factor ``None`` becomes the lowered platform's :func:`gru_jax.default_unroll`.

This module imports jax and :mod:`gru_jax._loops`, :mod:`gru_jax._pallas_kernel`,
:mod:`gru_jax._pallas_bwd`, :mod:`gru_jax._pallas_tpu`.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from gru_jax import _loops, _pallas_bwd, _pallas_kernel, _pallas_tpu
from gru_jax._pallas_kernel import Spec

# (pass, kernel) -> launch(spec, interpret, unroll, *operands) -> outputs.
LAUNCHES = {
    ("forward", "gpu"): _pallas_kernel.forward_gpu,
    ("forward", "tpu"): _pallas_tpu.forward_tpu,
    ("backward", "gpu"): _pallas_bwd.backward_gpu,
    ("backward", "tpu"): _pallas_tpu.backward_tpu,
}
# The kernel each platform compiles (the CPU interprets the GPU kernel).
KERNEL_OF_PLATFORM = {"cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}

INTERPRET_WARNING = (
    'impl="pallas" runs its kernel in Pallas\'s interpret mode on the CPU: that checks its '
    'numbers but is far slower than impl="xla" (or "auto"), which compiles for the CPU'
)
_warned = False


class Launch(NamedTuple):
    """A primitive's static parameters: which pass, its spec, and the ``in_axes`` of each
    ``vmap`` applied to it, innermost first."""

    pass_: str
    spec: Spec
    vmapped: tuple = ()


kernel_p = Primitive("gru_pallas_kernel")
kernel_p.multiple_results = True


def launch(pass_: str, spec: Spec, out_shapes, *operands):
    """Runs the ``pass_`` (``"forward"`` or ``"backward"``) kernel on ``operands``,
    lowered for the platform it is compiled for; ``out_shapes`` are its outputs'
    ``jax.ShapeDtypeStruct``s."""
    if spec.cpu_kernel == "tpu":
        # TPU interpret mode runs the kernel through ordered callbacks, which a lowering
        # rule cannot emit: it is chosen where the program is traced, for tests on a CPU.
        return _run(Launch(pass_, spec), "tpu", True, spec.unroll or 1, *operands)
    out_avals = tuple(jax.core.ShapedArray(s.shape, jnp.dtype(s.dtype)) for s in out_shapes)
    return kernel_p.bind(*operands, launch=Launch(pass_, spec), out_avals=out_avals)


def _run(launch: Launch, kernel: str, interpret: bool, unroll: int, *operands):
    fn = functools.partial(LAUNCHES[launch.pass_, kernel], launch.spec, interpret, unroll)
    for in_axes in launch.vmapped:
        fn = jax.vmap(fn, in_axes=in_axes)
    return fn(*operands)


def _warn_interpreted() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(INTERPRET_WARNING, UserWarning, stacklevel=2)


def _lowering(platform: str):
    def rule(ctx, *operands, launch: Launch, out_avals):
        del out_avals
        if platform == "cpu":
            _warn_interpreted()
            kernel, interpret = "gpu", True
        else:
            kernel, interpret = KERNEL_OF_PLATFORM[platform], False
        unroll = launch.spec.unroll or _loops.default_unroll(platform)
        fn = functools.partial(_run, launch, kernel, interpret, unroll)
        return mlir.lower_fun(fn, multiple_results=True)(ctx, *operands)

    return rule


def _batch(operands, dims, *, launch: Launch, out_avals):
    size = next(a.shape[d] for a, d in zip(operands, dims, strict=True) if d is not None)
    batched = launch._replace(vmapped=(*launch.vmapped, tuple(dims)))
    out_avals = tuple(a.update(shape=(size, *a.shape)) for a in out_avals)
    outs = kernel_p.bind(*operands, launch=batched, out_avals=out_avals)
    return outs, [0] * len(outs)


kernel_p.def_abstract_eval(lambda *operands, launch, out_avals: list(out_avals))
kernel_p.def_impl(
    lambda *operands, **params: jax.jit(functools.partial(kernel_p.bind, **params))(*operands)
)
batching.primitive_batchers[kernel_p] = _batch
for _platform in ("cpu", "cuda", "rocm", "tpu"):
    mlir.register_lowering(kernel_p, _lowering(_platform), platform=_platform)
