"""The benchmark's shapes and data: :class:`Config`, :class:`Case` and :func:`make_case`.

A :class:`Config` is one benchmark shape; :func:`make_case` draws its params (torch's
default init) and inputs once, and every peer (:mod:`gru_jax.bench._peers`) runs on that
same :class:`Case`.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

import gru_jax


class Unavailable(RuntimeError):
    """A peer cannot run here (library missing, wrong backend); the message says why."""


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark shape: ``B, T, D, H``, layers, directions, variable lengths."""

    name: str
    batch: int
    steps: int
    features: int
    hidden: int
    layers: int = 1
    bidirectional: bool = False
    variable_lengths: bool = False

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def layer_inputs(self) -> list[int]:
        """``D_l`` of every layer: ``D``, then ``K*H``."""
        return [self.features] + [self.directions * self.hidden] * (self.layers - 1)

    def forward_flops(self) -> float:
        """Matmul FLOPs of the forward pass: ``sum_l K * 2*B*T*3H*(D_l + H)``."""
        g = 3 * self.hidden
        return float(
            sum(
                self.directions * 2 * self.batch * self.steps * g * (d + self.hidden)
                for d in self.layer_inputs()
            )
        )

    def state_bytes(self) -> int:
        """Bytes of every hidden state of every step (float32): ``T*B*H*L*K*4``."""
        return self.steps * self.batch * self.hidden * self.layers * self.directions * 4

    def describe(self) -> str:
        s = f"B={self.batch} T={self.steps} D={self.features} H={self.hidden} L={self.layers}"
        if self.bidirectional:
            s += " bidir"
        if self.variable_lengths:
            s += " varlen"
        return s


# The precisions a case can run in; "bfloat16" is each library's own bfloat16 recipe, as a
# user would pick it, described (also for the report) by BFLOAT16_RECIPES.
DTYPES = ("float32", "bfloat16")
BFLOAT16_RECIPES = (
    "Each implementation runs its own bfloat16 mode: gru_jax `dtype=jnp.bfloat16` (bfloat16 "
    "matmul inputs; float32 params, carry and gate math), flax `GRUCell(dtype=jnp.bfloat16)` "
    "(float32 params), Keras's `mixed_bfloat16` policy, torch's module and input cast to "
    "bfloat16 (bfloat16 params and state: `torch.autocast` on CPU leaves `nn.GRU` in "
    "float32)."
)


@dataclasses.dataclass
class Case:
    """A config with its data: our params tree and NumPy inputs shared by every peer.

    ``dtype``: one of :data:`DTYPES`, the precision every implementation computes in.
    """

    config: Config
    params: dict
    x: np.ndarray
    lengths: np.ndarray | None
    dtype: str = "float32"

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    def valid_steps(self) -> np.ndarray:
        """``bool[B, T]``: True at the steps within each sequence's length."""
        cfg = self.config
        if self.lengths is None:
            return np.ones((cfg.batch, cfg.steps), bool)
        return np.arange(cfg.steps)[None, :] < self.lengths[:, None]


def make_case(config: Config, seed: int = 0, dtype: str = "float32") -> Case:
    """Draws params (torch's default init) and inputs; lengths in ``[T/4, T]``, max ``T``.

    The params and inputs are float32 whatever ``dtype`` (see :data:`DTYPES`) says.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
    key = jax.random.key(seed)
    params = gru_jax.init_gru(
        key,
        config.features,
        config.hidden,
        num_layers=config.layers,
        bidirectional=config.bidirectional,
    )
    params = jax.tree.map(np.asarray, params)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((config.batch, config.steps, config.features), dtype=np.float32)
    lengths = None
    if config.variable_lengths:
        lengths = rng.integers(max(1, config.steps // 4), config.steps + 1, config.batch)
        lengths[0] = config.steps
        lengths = lengths.astype(np.int32)
    return Case(config, params, x, lengths, dtype)
