"""Flax linen modules over the pure core: parameters and rng streams only, no math.

Parameters live under ``{"params": tree}`` where ``tree`` is exactly the core's params tree
(see :mod:`gru_jax._params`), so ``from_torch`` output, NNX modules and checkpoints share it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from gru_jax import _cell, _options, initializers

Initializer = initializers.Initializer


class GRU(nn.Module):
    r"""Multi-layer, optionally bidirectional GRU with ``torch.nn.GRU`` semantics.

    The cell (gates ``r, z, n``; see :func:`gru_jax.gru_step` for the equations) is run over
    time with ``jax.lax.scan`` by :func:`gru_jax.gru`. The input size is inferred from ``x``.

    Attributes:
      hidden_size: ``H``, features of the hidden state.
      num_layers: ``L``, stacked layers.
      bias: whether the layers have ``b_ih``/``b_hh``.
      batch_first: ``x``/``output`` are ``(B, T, ·)`` if True (default, unlike torch) else
        ``(T, B, ·)``.
      dropout: drop probability on each layer's output but the last, when
        ``deterministic=False``; drawn from the ``'dropout'`` rng stream. A module that can
        drop (``dropout > 0``, two layers or more) must be told its mode: ``deterministic``
        as an attribute or at the call (as ``flax.linen.Dropout``); an ``apply`` without
        either raises ``ValueError`` rather than guess (``init`` needs neither).
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
      deterministic: the default mode: ``True`` no dropout (inference), ``False`` dropout
        (training); ``None``: given at the call.

    Call ``gru(x, h0=None, *, lengths=None, deterministic=None) -> (output, h_n)``; shapes as
    :func:`gru_jax.gru`.
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
        options = _options.of(self)
        x = jnp.asarray(x)
        if x.ndim not in (2, 3):
            raise ValueError(
                "x must have shape (B, T, D) (batch_first) / (T, B, D), or unbatched (T, D); "
                f"got shape {x.shape}"
            )
        params = {}
        for layer in range(self.num_layers):
            name = f"layer_{layer}"
            if self.has_variable("params", name):
                # Read, not self.param: Flax would trace the initializer on every call to
                # check the shapes, which check_params does without tracing anything.
                params[name] = nn.unbox(self.get_variable("params", name))
            else:
                d_in = x.shape[-1] if layer == 0 else options.num_directions * self.hidden_size
                params[name] = self.param(name, self._init_layer, d_in)
        options.check_params(params)
        key = None
        if options.drops(self._mode(options, deterministic)):
            if not self.has_rng("dropout"):
                raise ValueError(
                    f"GRU(dropout={self.dropout}) with deterministic=False needs a 'dropout' rng: "
                    "model.apply(variables, x, deterministic=False, rngs={'dropout': key})"
                )
            key = self.make_rng("dropout")
        return options.run(params, x, h0, lengths=lengths, key=key)

    def _mode(self, options, deterministic: bool | None) -> bool:
        """The call's ``deterministic``, else the attribute's; refuses to guess when it
        matters (a module that can drop, outside ``init``)."""
        mode = self.deterministic if deterministic is None else deterministic
        if mode is None:
            if options.drops(False) and not self.is_initializing():
                raise ValueError(
                    f"GRU(dropout={self.dropout}) needs its mode: pass deterministic=True "
                    "(inference, no dropout) or deterministic=False with "
                    "rngs={'dropout': key} (training) to apply, or set it as the module's "
                    "deterministic attribute"
                )
            mode = True
        return mode

    def _init_layer(self, key, in_features: int):
        return initializers.init_gru(
            key,
            in_features,
            self.hidden_size,
            bidirectional=self.bidirectional,
            bias=self.bias,
            kernel_init=self.kernel_init,
            recurrent_kernel_init=self.recurrent_kernel_init,
            bias_init=self.bias_init,
            param_dtype=self.param_dtype,
        )["layer_0"]


class GRUCell(nn.RNNCellBase):
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

    hidden_size: int
    bias: bool = True
    reset_after: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer | None = None
    recurrent_kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
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
        if inputs.ndim < 1:
            raise ValueError(f"inputs must have shape (..., D); got {inputs.shape}")
        in_features = inputs.shape[-1]
        cell = self._params(in_features)
        h_new = _cell.gru_step(cell, carry, inputs, reset_after=self.reset_after, dtype=self.dtype)
        return h_new, h_new

    def _params(self, in_features: int):
        default = initializers.torch_uniform(self.hidden_size)
        g = 3 * self.hidden_size
        cell = {
            "w_ih": self.param(
                "w_ih", self.kernel_init or default, (in_features, g), self.param_dtype
            ),
            "w_hh": self.param(
                "w_hh",
                self.recurrent_kernel_init or default,
                (self.hidden_size, g),
                self.param_dtype,
            ),
        }
        if self.bias:
            for name in ("b_ih", "b_hh"):
                cell[name] = self.param(name, self.bias_init or default, (g,), self.param_dtype)
        return cell

    @nn.nowrap
    def initialize_carry(self, rng, input_shape: tuple[int, ...]):
        """Zero (``carry_init``) state of shape ``(*batch, H)`` for inputs ``(*batch, D)``."""
        batch_dims = tuple(input_shape[:-1])
        return self.carry_init(rng, (*batch_dims, self.hidden_size), self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1
