"""Flax linen modules over the pure core: parameters and rng streams only, no math.

Parameters live under ``{"params": tree}`` where ``tree`` is exactly the core's params tree
(see :mod:`gru_jax._params`), so ``from_torch`` output, NNX modules and checkpoints share it.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from gru_jax import _cell, _options, initializers

Initializer = initializers.Initializer


@_options.document
class GRU(_options.GRUOptions, nn.Module):
    r"""Multi-layer, optionally bidirectional GRU with ``torch.nn.GRU`` semantics.

    The cell (gates ``r, z, n``; see :func:`gru_jax.gru_step` for the equations) is run over
    time with ``jax.lax.scan`` by :func:`gru_jax.gru`. The input size is inferred from ``x``.

    Attributes:
      {options}
      deterministic: the default mode: ``True`` no dropout (inference), ``False`` dropout
        (training), drawn from the ``'dropout'`` rng stream; ``None``: given at the call. A
        module that can drop (``dropout > 0``, two layers or more) must be told its mode,
        here or at the call (as ``flax.linen.Dropout``); an ``apply`` without either raises
        ``ValueError`` rather than guess (``init`` needs neither).

    Call ``gru(x, h0=None, *, lengths=None, deterministic=None) -> (output, h_n)``; shapes as
    :func:`gru_jax.gru`.
    """

    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x, h0=None, *, lengths=None, deterministic: bool | None = None):
        """Runs the GRU.

        Args:
          x: ``(B, T, D)`` if ``batch_first`` else ``(T, B, D)``, or unbatched ``(T, D)``.
          h0: ``(L*K, B, H)`` (unbatched ``(L*K, H)``) or ``None`` for zeros.
          lengths: integer ``(B,)`` valid lengths in ``[0, T]``, or ``None``.
          deterministic: if False and ``dropout > 0``, apply dropout between layers using the
            ``'dropout'`` rng stream; ``None``: the module's ``deterministic`` attribute.

        Raises:
          ValueError: as :func:`gru_jax.gru`; also when the module can drop and neither the
            call nor the module says ``deterministic``, or dropout is on and no
            ``'dropout'`` rng was given.

        Returns:
          ``(output, h_n)``: ``(B, T, K*H)`` (or time-major/unbatched) and ``(L*K, B, H)``.
        """
        _options.check_sizes(self)  # gru() checks the other options, and x
        x = jnp.asarray(x)
        params = self._stack_params(_in_features(x))
        _options.check_params(self, params)
        key = self._dropout_key(deterministic)
        return _options.run(self, params, x, h0, lengths=lengths, key=key)

    def _stack_params(self, in_features: int) -> dict:
        """The stack tree: each layer's params as stored, or drawn when initializing."""
        params = {}
        for layer in range(self.num_layers):
            name = f"layer_{layer}"
            if self.has_variable("params", name):
                # Read, not self.param: Flax would trace the initializer on every call to
                # check the shapes, which check_params does without tracing anything.
                params[name] = nn.unbox(self.get_variable("params", name))
            else:
                size = (
                    in_features if layer == 0 else _options.num_directions(self) * self.hidden_size
                )
                params[name] = self.param(name, self._init_layer, size)
        return params

    def _init_layer(self, key, in_features: int):
        return _options.init_params(self, key, in_features, num_layers=1)["layer_0"]

    def _dropout_key(self, deterministic: bool | None):
        """The key of this call's dropout masks, or ``None`` when it applies no dropout."""
        if not _options.drops(self, self._mode(deterministic)):
            return None
        if not self.has_rng("dropout"):
            raise ValueError(
                f"GRU(dropout={self.dropout}) with deterministic=False needs a 'dropout' rng: "
                "model.apply(variables, x, deterministic=False, rngs={'dropout': key})"
            )
        return self.make_rng("dropout")

    def _mode(self, deterministic: bool | None) -> bool:
        """The call's ``deterministic``, else the attribute's; refuses to guess when it
        matters (a module that can drop, outside ``init``)."""
        mode = self.deterministic if deterministic is None else deterministic
        if mode is None:
            if _options.drops(self, False) and not self.is_initializing():
                raise ValueError(
                    f"GRU(dropout={self.dropout}) needs its mode: pass deterministic=True "
                    "(inference, no dropout) or deterministic=False with "
                    "rngs={'dropout': key} (training) to apply, or set it as the module's "
                    "deterministic attribute"
                )
            mode = True
        return mode


class GRUCell(_options.CellOptions, nn.RNNCellBase):
    r"""One GRU step, the ``torch.nn.GRUCell`` twin, usable in ``flax.linen.RNN``.

    Follows Flax's cell convention ``(carry, x) -> (new_carry, output)`` (both are ``h'``),
    so it drops into ``nn.RNN`` and ``nn.Bidirectional``. torch's ``h = cell(x, h)`` is
    ``h, _ = cell.apply(variables, h, x)``. Equations: :func:`gru_jax.gru_step`.

    Attributes:
      hidden_size: ``H``.
      bias: whether the cell has ``b_ih``/``b_hh``.
      reset_after: ``True``: torch cell; ``False``: Cho et al. (2014).
      dtype, param_dtype, kernel_init, recurrent_kernel_init, bias_init: as :class:`GRU`.
      carry_init: initializer of the carry in :meth:`initialize_carry` (zeros).

    Params: ``{"w_ih": (D, 3H), "w_hh": (H, 3H), "b_ih": (3H,), "b_hh": (3H,)}``.
    """

    carry_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, carry, inputs):
        """One step.

        Args:
          carry: ``h``, ``(*batch, H)``.
          inputs: ``x``, ``(*batch, D)``.

        Returns:
          ``(h', h')``, each ``(*batch, H)`` in the dtype of ``carry``.
        """
        initializers.check_size("hidden_size", self.hidden_size)
        inputs = jnp.asarray(inputs)
        cell = self._params(_in_features(inputs))
        h_new = _cell.gru_step(cell, carry, inputs, reset_after=self.reset_after, dtype=self.dtype)
        return h_new, h_new

    def _params(self, in_features: int) -> dict:
        """The cell's params, declared with the initializers and shapes of
        :func:`gru_jax.init_cell` (each drawn from this module's rng for its name)."""
        inits = _options.init_kwargs(self)
        dtype = inits.pop("param_dtype")
        layout = initializers.cell_initializers(in_features, self.hidden_size, **inits)
        return {
            name: self.param(name, init, shape, dtype) for name, (init, shape) in layout.items()
        }

    @nn.nowrap
    def initialize_carry(self, rng, input_shape: tuple[int, ...]):
        """Zero (``carry_init``) state of shape ``(*batch, H)`` for inputs ``(*batch, D)``."""
        batch_dims = tuple(input_shape[:-1])
        return self.carry_init(rng, (*batch_dims, self.hidden_size), self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


def _in_features(x) -> int:
    """The feature size of ``x``, its last axis, for the first layer's params. A scalar has
    none: any size will do, :func:`gru_jax.gru` and :func:`gru_jax.gru_step` refuse it."""
    return x.shape[-1] if x.ndim else 1
