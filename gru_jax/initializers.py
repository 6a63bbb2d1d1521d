"""Parameter initializers and the creation of params trees (no flax import).

The default matches torch: every weight and bias of ``nn.GRU``/``nn.GRUCell`` is drawn from
``U(-1/sqrt(H), 1/sqrt(H))``. For Flax's ``GRUCell`` style, pass
``kernel_init=jax.nn.initializers.lecun_normal()``,
``recurrent_kernel_init=jax.nn.initializers.orthogonal()`` and
``bias_init=jax.nn.initializers.zeros``; each initializer receives one direction's matrix,
``(D, 3H)`` or ``(H, 3H)``, and biases ``(3H,)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["Initializer", "check_size", "init_cell", "init_gru", "torch_uniform"]

Initializer = Callable[..., jax.Array]


def check_size(name: str, value) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``value`` is an ``int >= 1`` (not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


def torch_uniform(hidden_size: int) -> Initializer:
    """``U(-1/sqrt(H), 1/sqrt(H))``, torch's initializer for every GRU parameter."""
    bound = 1.0 / float(hidden_size) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def cell_initializers(
    in_features: int,
    hidden_size: int,
    bias: bool,
    kernel_init: Initializer | None,
    recurrent_kernel_init: Initializer | None,
    bias_init: Initializer | None,
) -> dict[str, tuple[Initializer, tuple[int, ...]]]:
    """Each parameter of one cell as ``name: (initializer, shape)``: what :func:`init_cell`
    draws and the linen ``GRUCell`` declares (not in ``__all__``: the package's own helper).

    ``None`` initializers mean torch's ``U(-1/sqrt(H), 1/sqrt(H))``.
    """
    default = torch_uniform(hidden_size)
    g = 3 * hidden_size
    layout = {
        "w_ih": (kernel_init or default, (in_features, g)),
        "w_hh": (recurrent_kernel_init or default, (hidden_size, g)),
    }
    if bias:
        layout["b_ih"] = layout["b_hh"] = (bias_init or default, (g,))
    return layout


def init_cell(
    key,
    in_features: int,
    hidden_size: int,
    *,
    bias: bool = True,
    kernel_init: Initializer | None = None,
    recurrent_kernel_init: Initializer | None = None,
    bias_init: Initializer | None = None,
    param_dtype=jnp.float32,
) -> dict[str, jax.Array]:
    """Creates one cell's params: ``w_ih (D, 3H)``, ``w_hh (H, 3H)``, ``b_ih``/``b_hh (3H,)``.

    ``None`` initializers mean torch's ``U(-1/sqrt(H), 1/sqrt(H))``.
    """
    layout = cell_initializers(
        in_features,
        hidden_size,
        bias=bias,
        kernel_init=kernel_init,
        recurrent_kernel_init=recurrent_kernel_init,
        bias_init=bias_init,
    )
    # Four keys, biases or not: a cell's kernels are the same with and without bias.
    keys = dict(zip(("w_ih", "w_hh", "b_ih", "b_hh"), jax.random.split(key, 4), strict=True))
    return {name: init(keys[name], shape, param_dtype) for name, (init, shape) in layout.items()}


def init_gru(
    key,
    in_features: int,
    hidden_size: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    bias: bool = True,
    kernel_init: Initializer | None = None,
    recurrent_kernel_init: Initializer | None = None,
    bias_init: Initializer | None = None,
    param_dtype=jnp.float32,
) -> dict[str, dict[str, jax.Array]]:
    """Creates a stack params tree ``{"layer_l": {"w_ih": (K, D_l, 3H), ...}}``.

    Each direction of each layer is initialized as its own cell (:func:`init_cell`), so
    matrix initializers such as ``orthogonal`` see one ``(D, 3H)`` or ``(H, 3H)`` matrix.

    Raises:
      ValueError: if ``in_features``, ``hidden_size`` or ``num_layers`` is below 1.
    """
    for name, value in (
        ("in_features", in_features),
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
    ):
        check_size(name, value)
    num_dirs = 2 if bidirectional else 1
    cell_options = {
        "bias": bias,
        "kernel_init": kernel_init,
        "recurrent_kernel_init": recurrent_kernel_init,
        "bias_init": bias_init,
        "param_dtype": param_dtype,
    }
    params = {}
    keys = jax.random.split(key, num_layers * num_dirs)
    for layer in range(num_layers):
        d_in = in_features if layer == 0 else num_dirs * hidden_size
        cells = [
            init_cell(keys[layer * num_dirs + k], d_in, hidden_size, **cell_options)
            for k in range(num_dirs)
        ]
        params[f"layer_{layer}"] = {n: jnp.stack([c[n] for c in cells]) for n in cells[0]}
    return params
