"""gru_jax: ``torch.nn.GRU`` semantics in JAX.

A pure core (:func:`gru_step`, :func:`gru`) scanned with ``jax.lax.scan``, wrapped by thin
Flax linen modules (:class:`GRU`, :class:`GRUCell`) and Flax NNX modules (``gru_jax.nnx``).
"""

from gru_jax import checkpoint, initializers, interop, nnx
from gru_jax._cell import gru_step
from gru_jax._loops import default_unroll
from gru_jax._params import cell_of
from gru_jax._stack import gru
from gru_jax.initializers import init_cell, init_gru
from gru_jax.linen import GRU, GRUCell

__version__ = "0.1.0"

__all__ = [
    "GRU",
    "GRUCell",
    "cell_of",
    "checkpoint",
    "default_unroll",
    "gru",
    "gru_step",
    "init_cell",
    "init_gru",
    "initializers",
    "interop",
    "nnx",
]
