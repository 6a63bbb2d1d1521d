"""Params trees: their checks, their dimensions, and moving between cells and stacks.

Public-internal helpers that every other module may import (the interop converters, the NNX
modules, checkpoints and the core itself); this module imports nothing from gru_jax.

Two layouts (see :mod:`gru_jax._cell` for the shape legend):

* a *cell* (one layer, one direction), as :func:`gru_jax.gru_step` takes it::

      {"w_ih": (D, 3H), "w_hh": (H, 3H), "b_ih": (3H,), "b_hh": (3H,)}

* a *stack*, as :func:`gru_jax.gru` takes it; directions are stacked on a leading ``K`` axis
  (index 0 forward, 1 reverse) so that both directions share one loop::

      {"layer_0": {"w_ih": (K, D, 3H), "w_hh": (K, H, 3H), "b_ih": (K, 3H), "b_hh": (K, 3H)},
       "layer_1": {"w_ih": (K, K*H, 3H), ...}, ...}

``b_ih``/``b_hh`` are absent when a layer has no bias. The kernels are the transposes of
torch's ``weight_ih_l{l}`` / ``weight_hh_l{l}`` (``x @ w_ih`` rather than ``W x``).

The gates are ``r, z, n`` along the last axis of every parameter, the order of torch and
Flax; ONNX and Keras order them ``z, r, h`` (``h`` is ``n``): :func:`reorder_gates` with
:data:`ZRH` converts either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

CELL_KEYS = frozenset({"w_ih", "w_hh", "b_ih", "b_hh"})


ZRH = (1, 0, 2)
"""The gate order of ONNX and Keras, ``z, r, h``, as indices of our ``r, z, n`` blocks. It only
swaps the first two, so the same order also takes theirs back to ours."""


def reorder_gates(a, order) -> np.ndarray:
    """The three gate blocks of the last axis of ``a (..., 3H)``, taken in ``order``.

    Args:
      a: an array whose last axis is three gate blocks of ``H`` each (a kernel, a bias).
      order: which block of ``a`` each block of the result is, e.g. :data:`ZRH`.

    Returns:
      A NumPy array of ``a``'s shape and dtype.
    """
    blocks = np.split(np.asarray(a), 3, axis=-1)
    return np.concatenate([blocks[i] for i in order], axis=-1)


def unwrap(tree):
    """Accepts ``{"params": tree}`` (linen variables) as well as the bare tree."""
    if isinstance(tree, Mapping) and set(tree) == {"params"}:
        return tree["params"]
    return tree


def check_cell_keys(cell_params, name: str = "cell_params") -> None:
    """Raises unless ``cell_params`` is a mapping with ``w_ih``, ``w_hh`` and both or neither
    of ``b_ih``, ``b_hh``."""
    if not isinstance(cell_params, Mapping):
        raise TypeError(f"{name} must be a mapping of arrays; got {type(cell_params).__name__}")
    keys = set(cell_params)
    has_bias = {"b_ih", "b_hh"} & keys
    missing = {"w_ih", "w_hh"} - keys
    if has_bias and len(has_bias) != 2:
        missing |= {"b_ih", "b_hh"} - keys
    extra = keys - CELL_KEYS
    if missing or extra:
        raise ValueError(
            f"{name} must have keys w_ih, w_hh and optionally b_ih, b_hh; "
            f"missing {sorted(missing)}, unexpected {sorted(extra)}"
        )


def cell_dims(cell_params, name: str = "cell_params") -> tuple[int, int]:
    """Returns ``(D, H)`` of a cell tree, checking that its arrays agree.

    Raises:
      TypeError: if ``cell_params`` is not a mapping.
      ValueError: on missing or unexpected keys, or shapes other than ``w_ih (D, 3H)``,
        ``w_hh (H, 3H)``, ``b_ih``/``b_hh (3H,)``.
    """
    check_cell_keys(cell_params, name)
    w_ih, w_hh = cell_params["w_ih"], cell_params["w_hh"]
    if w_hh.ndim != 2 or w_hh.shape[1] != 3 * w_hh.shape[0]:
        raise ValueError(f"{name}['w_hh'] must have shape (H, 3H); got {w_hh.shape}")
    hidden = w_hh.shape[0]
    if w_ih.ndim != 2 or w_ih.shape[1] != 3 * hidden:
        raise ValueError(
            f"{name}['w_ih'] must have shape (D, 3H) = (D, {3 * hidden}); got {w_ih.shape}"
        )
    for b in ("b_ih", "b_hh"):
        if b in cell_params and cell_params[b].shape != (3 * hidden,):
            raise ValueError(
                f"{name}['{b}'] must have shape (3H,) = ({3 * hidden},); got {cell_params[b].shape}"
            )
    return w_ih.shape[0], hidden


def stack_dims(params) -> tuple[int, int, int, int]:
    """Returns ``(L, K, D, H)`` of a stack params tree, checking that every layer agrees.

    Raises:
      ValueError: if the tree does not have the stack layout of the module docstring.
    """
    if not isinstance(params, Mapping) or not params:
        raise ValueError("params must be a non-empty mapping {'layer_0': {...}, ...}")
    num_layers = len(params)
    expected = {f"layer_{i}" for i in range(num_layers)}
    if set(params) != expected:
        raise ValueError(
            f"params must have keys layer_0 .. layer_{num_layers - 1}; got {sorted(params)}"
        )
    num_dirs = hidden = in_features = None
    for i in range(num_layers):
        lp = params[f"layer_{i}"]
        name = f"params['layer_{i}']"
        check_cell_keys(lp, name)
        w_ih, w_hh = lp["w_ih"], lp["w_hh"]
        if w_hh.ndim != 3 or w_hh.shape[2] != 3 * w_hh.shape[1] or w_hh.shape[0] not in (1, 2):
            raise ValueError(
                f"{name}['w_hh'] must have shape (K, H, 3H), K in (1, 2); got {w_hh.shape}"
            )
        if i == 0:
            num_dirs, hidden = w_hh.shape[0], w_hh.shape[1]
            if w_ih.ndim != 3:
                raise ValueError(f"{name}['w_ih'] must have shape (K, D, 3H); got {w_ih.shape}")
            in_features = w_ih.shape[1]
        want_d = in_features if i == 0 else num_dirs * hidden
        checks = {
            "w_hh": (num_dirs, hidden, 3 * hidden),
            "w_ih": (num_dirs, want_d, 3 * hidden),
            "b_ih": (num_dirs, 3 * hidden),
            "b_hh": (num_dirs, 3 * hidden),
        }
        for key, shape in checks.items():
            if key in lp and lp[key].shape != shape:
                raise ValueError(f"{name}['{key}'] must have shape {shape}; got {lp[key].shape}")
    return num_layers, num_dirs, in_features, hidden


def check_same_tree(expected, got, name: str = "params") -> None:
    """Raises ``ValueError`` unless ``got`` has exactly ``expected``'s keys and leaf shapes.

    Every difference is listed (``missing /layer_1/b_ih; /layer_0/w_hh: expected shape ...``),
    so that a wrong tree is rejected whole, never loaded in part.
    """
    problems = []

    def walk(exp, val, path):
        if isinstance(exp, Mapping):
            if not isinstance(val, Mapping):
                problems.append(f"{path or '/'}: expected a mapping, got {type(val).__name__}")
                return
            for k in sorted(set(exp) - set(val), key=str):
                problems.append(f"missing {path}/{k}")
            for k in sorted(set(val) - set(exp), key=str):
                problems.append(f"unexpected {path}/{k}")
            for k in sorted(set(exp) & set(val), key=str):
                walk(exp[k], val[k], f"{path}/{k}")
            return
        shape = getattr(val, "shape", None)
        if shape is None or tuple(shape) != tuple(exp.shape):
            problems.append(f"{path}: expected shape {tuple(exp.shape)}, got {shape}")

    walk(expected, got, "")
    if problems:
        raise ValueError(f"{name} does not match the expected tree: " + "; ".join(problems))


def cell_of(params, layer: int = 0, direction: int = 0) -> dict[str, Any]:
    """Extracts one cell's params (``w_ih (D, 3H)``, ...) from a stack params tree.

    The inverse of :func:`gru_jax.interop.stack_cells`; use it with :func:`gru_jax.gru_step`
    to run one layer and direction of a stack by hand.
    """
    return {k: v[direction] for k, v in params[f"layer_{layer}"].items()}


def same_structure(layers) -> bool:
    """Whether the layers' params trees have the same keys, shapes and dtypes (stackable)."""
    first = jax.tree.map(lambda a: (a.shape, a.dtype), layers[0])
    return all(jax.tree.map(lambda a: (a.shape, a.dtype), lp) == first for lp in layers[1:])
