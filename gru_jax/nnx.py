"""Flax NNX modules over the pure core: parameters and rng streams only, no math.

:class:`GRU` and :class:`GRUCell` hold exactly the core's params tree (see
:mod:`gru_jax._params`) as :class:`flax.nnx.Param` leaves, so that

* ``nnx.state(model, nnx.Param).to_pure_dict()`` (or :meth:`GRU.params_tree`) is the same
  tree as the linen module's ``variables["params"]``, :func:`gru_jax.interop.from_torch`'s
  output and what :mod:`gru_jax.checkpoint` saves;
* any such tree loads into a module with one line, checked (keys, shapes) so that a wrong
  tree never loads partially::

      model = gru_jax.nnx.GRU.from_params(tree)  # a new module (rngs=... to train with dropout)
      model.load_params(tree)                    # an existing one

  (``nnx.update(model, tree)`` also works, unchecked.)

Unlike the linen modules, NNX modules take ``in_features`` at construction and follow NNX's
training-mode convention (that of ``nnx.Dropout`` and ``torch.nn.Module``): dropout between
layers is active until ``model.eval()`` or ``deterministic=True``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gru_jax import _cell, _options, _params, initializers

Initializer = initializers.Initializer


def as_rngs(rngs, name: str = "rngs") -> nnx.Rngs:
    """``rngs`` as an ``nnx.Rngs``: one as is, an int seed or a PRNG key as its default
    stream (as flax's own NNX modules take them).

    Raises:
      TypeError: for anything else.
    """
    if isinstance(rngs, nnx.Rngs):
        return rngs
    is_key = isinstance(rngs, jax.Array) and (
        jax.dtypes.issubdtype(rngs.dtype, jax.dtypes.prng_key)
        or (rngs.dtype == jnp.uint32 and rngs.shape == (2,))
    )
    if (isinstance(rngs, int) and not isinstance(rngs, bool)) or is_key:
        return nnx.Rngs(rngs)
    raise TypeError(
        f"{name} must be an nnx.Rngs, an int seed or a PRNG key; got {type(rngs).__name__}"
    )


@dataclasses.dataclass(frozen=True)
class _Given:
    """What :meth:`GRU.from_params` and :meth:`GRUCell.from_params` pass as ``rngs``: the
    weights to hold, so that nothing is drawn, and the caller's rngs (``None`` or what
    :func:`as_rngs` takes), for dropout."""

    params: Mapping
    rngs: Any = None


def _first_params(rngs, draw) -> tuple[Mapping, nnx.Rngs | None]:
    """A new module's weights and rngs: those given by ``from_params``, else ``draw(key)``
    with a key of the ``params`` (or ``default``) stream of ``rngs``."""
    if isinstance(rngs, _Given):
        return rngs.params, None if rngs.rngs is None else as_rngs(rngs.rngs)
    rngs = as_rngs(rngs)
    return draw(rngs.params()), rngs


class _ParamsTree:
    """Holding, reading and checked loading of a module's params tree (GRU and GRUCell)."""

    def _hold(self, params: Mapping, dtype) -> None:
        """Stores ``params`` as ``nnx.Param`` leaves of ``dtype``, an ``nnx.Dict`` per layer."""
        for name, value in params.items():
            if isinstance(value, Mapping):
                layer = {k: nnx.Param(jnp.asarray(v, dtype)) for k, v in value.items()}
                setattr(self, name, nnx.Dict(layer))
            else:
                setattr(self, name, nnx.Param(jnp.asarray(value, dtype)))

    def params_tree(self) -> dict:
        """Returns the params tree as plain arrays: the linen/``from_torch`` layout.

        Equal to ``nnx.state(self, nnx.Param).to_pure_dict()``.
        """
        return nnx.state(self, nnx.Param).to_pure_dict()

    def load_params(self, params) -> None:
        """Replaces the parameters in place by ``params`` (checked, all or nothing).

        Args:
          params: a params tree of the same layout (linen ``variables``, ``{"params": tree}``,
            :func:`gru_jax.interop.from_torch` output, :func:`gru_jax.checkpoint.restore`
            output, another module's :meth:`params_tree`). Arrays are cast to this module's
            parameter dtypes.

        Raises:
          ValueError: if the keys or any shape differ from this module's; nothing is loaded.
        """
        current = self.params_tree()
        params = _params.unwrap(params)
        _params.check_same_tree(current, params, "params")
        cast = jax.tree.map(lambda old, new: jnp.asarray(new, old.dtype), current, dict(params))
        nnx.update(self, cast)


_RNGS = "nnx.Rngs | int | jax.Array"
# The keyword-only arguments after the options: rngs is only read, not kept as given.
_GRUArguments = _options.nnx_arguments(
    "GRU",
    _options.GRUOptions,
    [
        ("deterministic", "bool", dataclasses.field(default=False, kw_only=True)),
        ("rngs", dataclasses.InitVar[_RNGS], dataclasses.field(kw_only=True)),
    ],
)
_CellArguments = _options.nnx_arguments(
    "GRUCell",
    _options.CellOptions,
    [
        ("carry_init", "Initializer | None", dataclasses.field(default=None)),
        ("rngs", dataclasses.InitVar[_RNGS], dataclasses.field(kw_only=True)),
    ],
)


@_options.document
class GRU(_GRUArguments, nnx.Module, _ParamsTree):
    r"""Multi-layer, optionally bidirectional GRU with ``torch.nn.GRU`` semantics (Flax NNX).

    The NNX twin of :class:`gru_jax.GRU`: the same options, call and parameter tree, run by
    :func:`gru_jax.gru` (gates ``r, z, n``; equations in :func:`gru_jax.gru_step`).

    Args:
      in_features: ``D``, input features of the first layer.
      {options}
      deterministic: initial mode; ``False`` (training, as ``nnx.Dropout``) applies dropout.
        Set by ``model.train()`` / ``model.eval()`` or ``nnx.view(model, deterministic=...)``,
        overridden per call.
      rngs: ``nnx.Rngs`` (or an int seed or PRNG key, its default stream); the ``params``
        stream initializes the weights and the ``dropout``
        stream (falling back to ``default``) is forked for dropout.

    Attributes:
      layer_0, layer_1, ...: ``nnx.Dict`` of ``nnx.Param``: ``w_ih (K, D_l, 3H)``,
        ``w_hh (K, H, 3H)``, ``b_ih``/``b_hh (K, 3H)``, as in :mod:`gru_jax._params`.

    Call ``model(x, h0=None, *, lengths=None, deterministic=None, rngs=None)
    -> (output, h_n)``; shapes as :func:`gru_jax.gru`.
    """

    def __post_init__(self, rngs):
        """After the generated ``__init__`` has set the arguments as attributes: checks them,
        holds the first weights (drawn, or given by :meth:`from_params`) and, for a module
        that can drop, a fork of the dropout stream."""
        initializers.check_size("in_features", self.in_features)
        _options.check(self)
        tree, rngs = _first_params(
            rngs, lambda key: _options.init_params(self, key, self.in_features)
        )
        self._hold(tree, self.param_dtype)
        # Only a module that can drop keeps a dropout stream (a params-only Rngs is enough).
        stream = _dropout_stream(rngs) if _options.drops(self, deterministic=False) else None
        self.rngs = nnx.data(None if stream is None else stream.fork())

    def set_view(self, deterministic: bool | None = None):
        """Hook of ``nnx.view(model, deterministic=...)``, as ``nnx.Dropout``'s."""
        if deterministic is not None:
            self.deterministic = deterministic

    @classmethod
    def from_params(
        cls, params, *, rngs: nnx.Rngs | int | jax.Array | None = None, **options
    ) -> GRU:
        """Builds a module around an existing stack params tree (no random initialization).

        ``in_features``, ``hidden_size``, ``num_layers``, ``bidirectional``, ``bias`` and
        ``param_dtype`` are read from the tree; other options (``reset_after``,
        ``batch_first``, ``dropout``, ...) are passed as keywords.

        Args:
          params: ``{"layer_l": {"w_ih": (K, D_l, 3H), ...}}`` (or ``{"params": tree}``), e.g.
            from :func:`gru_jax.interop.from_torch` or a linen module's variables.
          rngs: ``nnx.Rngs`` whose ``dropout`` (or ``default``) stream feeds dropout; only
            needed to train with ``dropout > 0``.
          **options: the remaining constructor arguments.

        Returns:
          A :class:`GRU` whose :meth:`params_tree` equals ``params``.

        Raises:
          ValueError: if ``params`` is not a well-formed stack tree.
        """
        tree = _params.unwrap(params)
        num_layers, num_dirs, in_features, hidden = _params.stack_dims(tree)
        first = tree["layer_0"]
        read = {"num_layers": num_layers, "bidirectional": num_dirs == 2, "bias": "b_ih" in first}
        dtype = first["w_ih"].dtype
        return cls(
            in_features, hidden, **read, param_dtype=dtype, rngs=_Given(tree, rngs), **options
        )

    def __call__(self, x, h0=None, *, lengths=None, deterministic: bool | None = None, rngs=None):
        """Runs the GRU.

        Args:
          x: ``(B, T, D)`` if ``batch_first`` else ``(T, B, D)``, or unbatched ``(T, D)``.
          h0: ``(L*K, B, H)`` (unbatched ``(L*K, H)``) or ``None`` for zeros.
          lengths: integer ``(B,)`` valid lengths in ``[0, T]``, or ``None``.
          deterministic: overrides the module's mode for this call; ``False`` with
            ``dropout > 0`` applies dropout between layers.
          rngs: overrides the module's dropout stream: an ``nnx.Rngs`` (its ``dropout``
            stream), an ``nnx.RngStream`` or a PRNG key.

        Returns:
          ``(output, h_n)``: ``(B, T, K*H)`` (or time-major/unbatched) and ``(L*K, B, H)``.

        Raises:
          ValueError: as :func:`gru_jax.gru`; also if dropout must be applied and there is no
            rng stream.
        """
        deterministic = self.deterministic if deterministic is None else deterministic
        key = self._dropout_key(rngs) if _options.drops(self, deterministic) else None
        params = {
            f"layer_{i}": {k: p[...] for k, p in getattr(self, f"layer_{i}").items()}
            for i in range(self.num_layers)
        }
        return _options.run(self, params, x, h0, lengths=lengths, key=key)

    def _dropout_key(self, rngs):
        """The key of this call's masks: ``rngs`` if it is a key, else a draw of its dropout
        stream (of the module's, when ``rngs`` is ``None``)."""
        if isinstance(rngs, jax.Array):
            return rngs  # used as it is, as gru()'s key
        stream = self.rngs if rngs is None else _dropout_stream(rngs)
        if stream is None:
            raise ValueError(
                "dropout is active (deterministic=False) but the module has no 'dropout' or "
                "'default' rng stream: build it with rngs=nnx.Rngs(params=..., dropout=...), "
                "pass rngs= to the call, or use model.eval() / deterministic=True"
            )
        return stream()


def _dropout_stream(rngs) -> nnx.RngStream | None:
    """The ``dropout`` stream of ``rngs`` (its ``default`` one without it), or ``None`` when
    there is neither. ``rngs``: an ``nnx.Rngs``, one of its streams, an int seed or ``None``."""
    if rngs is None or isinstance(rngs, nnx.RngStream):
        return rngs
    rngs = as_rngs(rngs)
    if "dropout" not in rngs and "default" not in rngs:
        return None
    return rngs["dropout"]


class GRUCell(_CellArguments, nnx.Module, _ParamsTree):
    r"""One GRU step, the ``torch.nn.GRUCell`` twin (Flax NNX), usable in ``nnx.RNN``.

    Implements ``nnx.RNNCellBase``'s interface: ``cell(carry, x) -> (h', h')``,
    ``initialize_carry(input_shape, rngs=None)`` and ``num_feature_axes``, so it drops into
    ``flax.nnx.RNN`` and ``flax.nnx.Bidirectional``. torch's ``h = cell(x, h)`` is
    ``h, _ = cell(h, x)``. Equations: :func:`gru_jax.gru_step`.

    Args:
      in_features: ``D``.
      hidden_size: ``H``.
      bias: whether the cell has ``b_ih``/``b_hh``.
      reset_after: ``True``: torch cell; ``False``: Cho et al. (2014).
      dtype, param_dtype, kernel_init, recurrent_kernel_init, bias_init: as :class:`GRU`.
      carry_init: initializer of the carry in :meth:`initialize_carry`; ``None``: zeros.
      rngs: ``nnx.Rngs`` (or an int seed or PRNG key); the ``params`` stream initializes
        the weights.

    Attributes:
      w_ih, w_hh, b_ih, b_hh: ``nnx.Param`` of shapes ``(D, 3H)``, ``(H, 3H)``, ``(3H,)``,
        ``(3H,)`` (biases absent without ``bias``): the linen ``GRUCell`` tree.
    """

    def __post_init__(self, rngs):
        """Checks the sizes and holds the first weights (drawn, or given by
        :meth:`from_params`)."""
        initializers.check_size("in_features", self.in_features)
        initializers.check_size("hidden_size", self.hidden_size)
        options = _options.init_kwargs(self)

        def draw(key):
            return initializers.init_cell(key, self.in_features, self.hidden_size, **options)

        tree, _ = _first_params(rngs, draw)
        self._hold(tree, self.param_dtype)

    @classmethod
    def from_params(cls, params, **options) -> GRUCell:
        """Builds a cell around an existing cell params tree (no random initialization).

        ``in_features``, ``hidden_size``, ``bias`` and ``param_dtype`` are read from
        ``params`` (``{"w_ih": (D, 3H), "w_hh": (H, 3H), ...}``, e.g. from
        :func:`gru_jax.interop.from_torch` of an ``nn.GRUCell`` or
        :func:`gru_jax.interop.from_flax_linen_gru_cell`); ``reset_after`` etc. are keywords.

        Raises:
          ValueError: if ``params`` is not a well-formed cell tree.
        """
        tree = _params.unwrap(params)
        in_features, hidden = _params.cell_dims(tree, "params")
        dtype = tree["w_ih"].dtype
        return cls(
            in_features,
            hidden,
            bias="b_ih" in tree,
            param_dtype=dtype,
            rngs=_Given(tree),
            **options,
        )

    def __call__(self, carry, inputs):
        """One step, as :meth:`gru_jax.GRUCell.__call__`: ``carry`` ``h (*batch, H)`` and
        ``inputs`` ``x (*batch, D)`` give ``(h', h')``, in the dtype of ``carry``."""
        cell = {name: getattr(self, name)[...] for name in self._names()}
        h_new = _cell.gru_step(cell, carry, inputs, reset_after=self.reset_after, dtype=self.dtype)
        return h_new, h_new

    def _names(self):
        return ("w_ih", "w_hh", "b_ih", "b_hh") if self.bias else ("w_ih", "w_hh")

    def initialize_carry(
        self,
        input_shape: tuple[int, ...],
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        carry_init: Initializer | None = None,
    ):
        """Initial state ``(*batch, H)`` for inputs ``(*batch, D)``, in ``param_dtype``.

        Args:
          input_shape: shape of one step's input, ``(*batch, D)``.
          rngs: only needed by a random ``carry_init``: an ``nnx.Rngs`` (its ``carry``
            stream) or ``nnx.RngStream``, as ``nnx.RNN`` passes it.
          carry_init: overrides the constructor's ``carry_init``; ``None`` for both: zeros.
        """
        shape = (*tuple(input_shape)[:-1], self.hidden_size)
        init = carry_init or self.carry_init
        if init is None:
            return jnp.zeros(shape, self.param_dtype)
        if isinstance(rngs, nnx.Rngs):
            rngs = rngs.carry
        if rngs is None:
            raise ValueError("initialize_carry needs rngs when a carry_init is given")
        return init(rngs(), shape, self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1
