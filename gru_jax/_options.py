"""The options of the GRU modules, declared once for linen and NNX, and their way to ``gru``.

:class:`GRUOptions` declares what :class:`gru_jax.GRU` and :class:`gru_jax.nnx.GRU` share:
each option's name, type, default and description. The linen module inherits it (the
options are its dataclass fields); the NNX module's constructor is generated from it
(:func:`nnx_arguments`), and keeps them as attributes of the same names. :class:`CellOptions`
is the part of them that one cell has, for the linen and NNX ``GRUCell``. The module
docstrings, and so the API page, get the options' one description through :func:`document`.

The functions below read the options off any module that has them: :func:`check_sizes` and
:func:`check` refuse bad ones, :func:`init_params` draws a params tree, :func:`check_params`
compares a tree with them, :func:`run` calls :func:`gru_jax.gru`. The modules only own
parameters and rng streams.

This module imports jax.numpy and :mod:`gru_jax._dispatch`, :mod:`gru_jax._loops`,
:mod:`gru_jax._params`, :mod:`gru_jax._stack`, :mod:`gru_jax.initializers`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from gru_jax import _dispatch, _loops, _params, _stack, initializers

Initializer = initializers.Initializer

DESCRIPTION = """\
hidden_size: ``H``, features of the hidden state.
num_layers: ``L``, stacked layers.
bias: whether the layers have ``b_ih``/``b_hh``.
batch_first: ``x``/``output`` are ``(B, T, ·)`` if True (default, unlike torch) else
  ``(T, B, ·)``.
dropout: drop probability on each layer's output but the last (as torch), applied only in
  training mode (``deterministic=False``).
bidirectional: run a reverse direction too (``K = 2``).
reset_after: ``True``: torch/cuDNN cell; ``False``: Cho et al. (2014).
dtype: matmul input dtype (e.g. ``jnp.bfloat16``); carry and gates stay float32.
param_dtype: dtype of the parameters.
kernel_init, recurrent_kernel_init, bias_init: initializers of one direction's
  ``w_ih (D, 3H)``, ``w_hh (H, 3H)`` and biases ``(3H,)``; ``None``: torch's
  ``U(-1/sqrt(H), 1/sqrt(H))``.
unroll: unroll factor of the time loops; ``None``: 1 on the CPU, 8 on a GPU or
  TPU (:func:`gru_jax.gru`).
remat: recompute steps in the backward pass to save memory.
impl: the time loops: ``"auto"`` (default), ``"xla"`` or ``"pallas"``
  (:func:`gru_jax.gru`).
"""
"""The options' one description, ``name: text`` entries of a Google-style docstring section."""

PLACEHOLDER = "{options}"


def document(cls):
    """Writes :data:`DESCRIPTION` where ``cls``'s docstring has a line ``{options}``, at
    that line's indentation, so that every class documents the options in the same words."""
    if cls.__doc__:  # None under python -OO
        lines = []
        for line in cls.__doc__.splitlines():
            if line.strip() != PLACEHOLDER:
                lines.append(line)
                continue
            indent = line[: len(line) - len(line.lstrip())]
            lines += [indent + entry for entry in DESCRIPTION.splitlines()]
        cls.__doc__ = "\n".join(lines)
    return cls


# Neither repr nor eq: a module that inherits the fields keeps its own (flax writes them).
@document
@dataclasses.dataclass(repr=False, eq=False)
class GRUOptions:
    """The options of :class:`gru_jax.GRU` and :class:`gru_jax.nnx.GRU`, in their order.

    Attributes:
      {options}
    """

    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = True
    dropout: float = 0.0
    bidirectional: bool = False
    reset_after: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer | None = None
    recurrent_kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
    unroll: int | None = None
    remat: bool = False
    impl: str = "auto"


GRU_FIELDS = tuple(f.name for f in dataclasses.fields(GRUOptions))
CELL_FIELDS = (
    "hidden_size",
    "bias",
    "reset_after",
    "dtype",
    "param_dtype",
    "kernel_init",
    "recurrent_kernel_init",
    "bias_init",
)
INIT_FIELDS = ("bias", "kernel_init", "recurrent_kernel_init", "bias_init")
"""The options :func:`gru_jax.init_cell` and :func:`gru_jax.init_gru` take as keywords."""


def copy_fields(options, names: tuple[str, ...] | None = None) -> list[tuple]:
    """The fields of the dataclass ``options`` (those in ``names``, if given), in order, as
    :func:`dataclasses.make_dataclass` takes them: the same names, types and defaults."""
    return [
        (f.name, f.type, dataclasses.field(default=f.default))
        for f in dataclasses.fields(options)
        if names is None or f.name in names
    ]


def dataclass_of(name: str, fields: list, doc: str, **methods) -> type:
    """A dataclass of ``fields`` (and ``methods``) to inherit from: a module keeps its own
    repr and eq (flax writes them for linen) and its fields' order is that of ``fields``."""
    namespace = {"__doc__": doc, "__module__": __name__, **methods}
    return dataclasses.make_dataclass(name, fields, repr=False, eq=False, namespace=namespace)


CellOptions = dataclass_of(
    "CellOptions",
    copy_fields(GRUOptions, CELL_FIELDS),
    "The options of :class:`gru_jax.GRUCell`: those of :class:`GRUOptions` a cell has.",
)


def nnx_arguments(module: str, options, last: list) -> type:
    """The constructor arguments of the NNX module ``module``, as a dataclass to inherit
    from: ``in_features``, the fields of ``options`` (those of its linen twin), then ``last``
    (keyword-only ones; an ``InitVar`` for ``rngs``), so that no option is spelled twice."""
    fields = [("in_features", "int"), *copy_fields(options), *last]
    doc = f"The arguments of :class:`gru_jax.nnx.{module}`."
    return dataclass_of(f"{module}Arguments", fields, doc, __post_init__=_built_by_the_module)


def _built_by_the_module(self, *init_vars):
    # Declared so that the generated __init__ calls __post_init__: the module's own builds it.
    raise NotImplementedError(f"{type(self).__name__} must define __post_init__")


def check_sizes(options) -> None:
    """Raises ``ValueError`` unless ``hidden_size`` and ``num_layers`` are integers ``>= 1``:
    what a module needs before it can build its params (:func:`gru_jax.gru` checks the rest)."""
    initializers.check_size("hidden_size", options.hidden_size)
    initializers.check_size("num_layers", options.num_layers)


def check(options) -> None:
    """Raises ``ValueError`` naming the first option out of range, as :func:`gru_jax.gru`
    would at the first call: for a module built eagerly (NNX), which refuses them at once.
    Sizes below 1, ``dropout`` outside ``[0, 1)``, ``unroll`` not a positive integer or
    ``None``, an unknown ``impl``."""
    check_sizes(options)
    _stack.check_dropout(options.dropout)
    if options.unroll is not None:
        _loops.check_unroll(options.unroll)
    _dispatch.check_impl(options.impl)


def num_directions(options) -> int:
    return 2 if options.bidirectional else 1


def drops(options, deterministic: bool) -> bool:
    """Whether a call in this mode applies dropout (and so needs a key)."""
    return options.dropout > 0.0 and not deterministic and options.num_layers > 1


def init_kwargs(options) -> dict[str, Any]:
    """The keywords of :func:`gru_jax.init_cell` / :func:`gru_jax.init_gru` that the options
    set (:data:`INIT_FIELDS` and ``param_dtype``)."""
    kwargs = {name: getattr(options, name) for name in INIT_FIELDS}
    return kwargs | {"param_dtype": options.param_dtype}


def init_params(options, key, in_features: int, num_layers: int | None = None) -> dict:
    """A stack params tree drawn as the options say, ``num_layers`` layers (default: the
    options' own) whose first takes ``in_features``."""
    return initializers.init_gru(
        key,
        in_features,
        options.hidden_size,
        num_layers=options.num_layers if num_layers is None else num_layers,
        bidirectional=options.bidirectional,
        **init_kwargs(options),
    )


def check_params(options, params) -> None:
    """Raises ``ValueError`` unless ``params`` is a stack tree of the options' layers,
    directions, hidden size and bias (the input size is checked against ``x`` by
    :func:`gru_jax.gru`); the message gives each differing value of both."""
    layers, directions, _, hidden = _params.stack_dims(params)
    got = {
        "num_layers": layers,
        "bidirectional": directions == 2,
        "hidden_size": hidden,
        "bias": all("b_ih" in lp for lp in params.values()),
    }
    diffs = [
        f"{name}={value} in the params, {getattr(options, name)} in the module"
        for name, value in got.items()
        if value != getattr(options, name)
    ]
    if diffs:
        raise ValueError("params do not match the module's options: " + "; ".join(diffs))


def run(options, params, x, h0=None, *, lengths=None, key=None):
    """``gru_jax.gru(params, x, h0, ...)`` with the options."""
    return _stack.gru(
        params,
        x,
        h0,
        lengths=lengths,
        batch_first=options.batch_first,
        dropout=options.dropout,
        key=key,
        reset_after=options.reset_after,
        unroll=options.unroll,
        remat=options.remat,
        dtype=options.dtype,
        impl=options.impl,
    )
