"""The options of a GRU module and their one way to :func:`gru_jax.gru`, for linen and NNX.

Both module APIs keep the same constructor options under the same names; :func:`of` reads
them off either kind of module, checks them once, and :meth:`StackOptions.run` makes the
call. The modules themselves only own parameters and rng streams.

This module imports :mod:`gru_jax._stack`, :mod:`gru_jax._loops`, :mod:`gru_jax._params`,
:mod:`gru_jax.initializers`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gru_jax import _dispatch, _loops, _params, _stack, initializers


@dataclasses.dataclass(frozen=True)
class StackOptions:
    """What a :class:`gru_jax.GRU` / :class:`gru_jax.nnx.GRU` passes to :func:`gru_jax.gru`.

    Checked when built: ``hidden_size`` and ``num_layers`` integers ``>= 1``, ``dropout``
    in ``[0, 1)``, ``unroll`` an integer ``>= 1`` or ``None``, ``impl`` one of
    ``"auto"``, ``"xla"``, ``"pallas"``.
    """

    hidden_size: int
    num_layers: int
    bias: bool
    batch_first: bool
    dropout: float
    bidirectional: bool
    reset_after: bool
    dtype: Any
    unroll: int | None
    remat: bool
    impl: str

    def __post_init__(self):
        initializers.check_size("hidden_size", self.hidden_size)
        initializers.check_size("num_layers", self.num_layers)
        _stack.check_dropout(self.dropout)
        if self.unroll is not None:
            _loops.check_unroll(self.unroll)
        _dispatch.check_impl(self.impl)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def drops(self, deterministic: bool) -> bool:
        """Whether a call in this mode applies dropout (and so needs a key)."""
        return self.dropout > 0.0 and not deterministic and self.num_layers > 1

    def check_params(self, params) -> None:
        """Raises ``ValueError`` unless ``params`` is a stack tree of these options' layers,
        directions, hidden size and bias (the input size is checked against ``x`` by
        :func:`gru_jax.gru`)."""
        num_layers, num_dirs, _, hidden = _params.stack_dims(params)
        got = {
            "num_layers": num_layers,
            "bidirectional": num_dirs == 2,
            "hidden_size": hidden,
            "bias": all("b_ih" in lp for lp in params.values()),
        }
        diffs = [
            f"{k}={v} (module: {getattr(self, k)})" for k, v in got.items() if v != getattr(self, k)
        ]
        if diffs:
            raise ValueError("params do not match the module's options: " + ", ".join(diffs))

    def run(self, params, x, h0=None, *, lengths=None, key=None):
        """``gru_jax.gru(params, x, h0, ...)`` with these options."""
        return _stack.gru(
            params,
            x,
            h0,
            lengths=lengths,
            batch_first=self.batch_first,
            dropout=self.dropout,
            key=key,
            reset_after=self.reset_after,
            unroll=self.unroll,
            remat=self.remat,
            dtype=self.dtype,
            impl=self.impl,
        )


_FIELDS = tuple(f.name for f in dataclasses.fields(StackOptions))


def of(module) -> StackOptions:
    """The (checked) :class:`StackOptions` of a linen or NNX ``GRU``: its attributes."""
    return StackOptions(**{name: getattr(module, name) for name in _FIELDS})
