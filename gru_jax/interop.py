"""Weights in and out: torch ``nn.GRU``/``nn.GRUCell`` state dicts <-> gru_jax params trees.

torch stores ``weight_ih_l{l}{sfx}`` as ``(3H, D)`` and ``weight_hh_l{l}{sfx}`` as ``(3H, H)``
with gates ``r, z, n`` along the first axis (``sfx`` is ``""`` or ``"_reverse"``); gru_jax
stores their transposes, directions stacked: ``w_ih (K, D, 3H)``, ``w_hh (K, H, 3H)``. The gate
order is the same, so conversion is a transpose and a stack. torch is not imported here: any
object with ``.detach().cpu().numpy()`` (a tensor) or ``np.asarray`` support is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from gru_jax import _core

_CELL_NAMES = {"weight_ih": "w_ih", "weight_hh": "w_hh", "bias_ih": "b_ih", "bias_hh": "b_hh"}
_GRU_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)(_reverse)?$")


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _unwrap(tree):
    """Accepts ``{"params": tree}`` (linen variables) as well as the bare tree."""
    if isinstance(tree, Mapping) and set(tree) == {"params"}:
        return tree["params"]
    return tree


def from_torch(state_dict, *, prefix: str = "") -> dict:
    """Converts a torch ``nn.GRU`` or ``nn.GRUCell`` state dict into a gru_jax params tree.

    Args:
      state_dict: a mapping from torch parameter names to tensors or NumPy arrays, as
        ``torch.nn.GRU(...).state_dict()`` returns (a module with ``.state_dict()`` is also
        accepted). ``nn.GRU`` names: ``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
        ``bias_hh_l0`` and ``*_reverse``; ``nn.GRUCell`` names: ``weight_ih``, ``weight_hh``,
        ``bias_ih``, ``bias_hh``.
      prefix: a prefix to strip (and select by), e.g. ``"encoder.gru."`` for a submodule of a
        bigger model's state dict.

    Returns:
      For ``nn.GRU``: ``{"layer_l": {"w_ih": (K, D_l, 3H), "w_hh": (K, H, 3H), "b_ih": (K, 3H),
      "b_hh": (K, 3H)}}``, for ``GRU(...).apply({"params": tree}, ...)``. For ``nn.GRUCell``:
      ``{"w_ih": (D, 3H), "w_hh": (H, 3H), "b_ih": (3H,), "b_hh": (3H,)}``. Arrays keep the
      torch dtype.

    Raises:
      ValueError: on missing, unexpected or inconsistently shaped entries.
    """
    if hasattr(state_dict, "state_dict") and not isinstance(state_dict, Mapping):
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping; got {type(state_dict).__name__}")
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"state_dict has no entries with prefix {prefix!r}")
    if set(sd) <= set(_CELL_NAMES):
        return _cell_from_torch(sd)
    return _gru_from_torch(sd)


def _cell_from_torch(sd) -> dict:
    missing = {"weight_ih", "weight_hh"} - set(sd)
    if ("bias_ih" in sd) != ("bias_hh" in sd):
        missing |= {"bias_ih", "bias_hh"} - set(sd)
    if missing:
        raise ValueError(f"torch GRUCell state_dict is missing {sorted(missing)}")
    cell = {_CELL_NAMES[k]: jnp.asarray(_to_numpy(v).T) for k, v in sd.items()}
    _core._cell_dims(cell, "converted GRUCell params")
    return cell


def _gru_from_torch(sd) -> dict:
    unexpected = sorted(k for k in sd if not _GRU_KEY.match(k))
    if unexpected:
        raise ValueError(f"unexpected keys in torch GRU state_dict: {unexpected}")
    parsed = {}
    for k, v in sd.items():
        name, layer, rev = _GRU_KEY.match(k).groups()
        parsed[(int(layer), 1 if rev else 0, name)] = _to_numpy(v)
    num_layers = 1 + max(layer for layer, _, _ in parsed)
    num_dirs = 2 if any(d == 1 for _, d, _ in parsed) else 1
    has_bias = any(name.startswith("bias") for _, _, name in parsed)
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if has_bias else [])
    expected = {
        (layer, d, n) for layer in range(num_layers) for d in range(num_dirs) for n in names
    }
    missing = expected - set(parsed)
    if missing:
        sfx = ["", "_reverse"]
        raise ValueError(
            "torch GRU state_dict is missing "
            f"{sorted(f'{n}_l{layer}{sfx[d]}' for layer, d, n in missing)}"
        )
    params = {}
    for layer in range(num_layers):
        params[f"layer_{layer}"] = {
            _CELL_NAMES[n]: jnp.asarray(
                np.stack([parsed[(layer, d, n)].T for d in range(num_dirs)])
            )
            for n in names
        }
    try:
        _core.stack_dims(params)
    except ValueError as err:
        raise ValueError(f"torch GRU state_dict has inconsistent shapes: {err}") from None
    return params


def to_torch(tree) -> dict[str, np.ndarray]:
    """Converts a gru_jax params tree (or a gradient tree of the same structure) to torch names.

    Args:
      tree: a stack tree ``{"layer_l": {...}}``, a cell tree ``{"w_ih", "w_hh", ...}``, or
        either wrapped as ``{"params": tree}``.

    Returns:
      ``{torch_name: np.ndarray}`` with torch's names and shapes (``weight_ih_l0`` is
      ``(3H, D)``, ...), ready for ``torch.nn.GRU(...).load_state_dict`` after
      ``torch.from_numpy``, or to compare gradients with ``param.grad``.

    Raises:
      ValueError: if the tree is neither layout.
    """
    tree = _unwrap(tree)
    if not isinstance(tree, Mapping):
        raise ValueError(f"expected a params tree mapping; got {type(tree).__name__}")
    inverse = {v: k for k, v in _CELL_NAMES.items()}
    if "w_ih" in tree:
        _core._cell_dims(tree, "tree")
        return {inverse[k]: np.ascontiguousarray(np.asarray(v).T) for k, v in tree.items()}
    _, num_dirs, _, _ = _core.stack_dims(tree)
    out = {}
    for layer in range(len(tree)):
        for name, value in tree[f"layer_{layer}"].items():
            value = np.asarray(value)
            for d in range(num_dirs):
                sfx = "_reverse" if d == 1 else ""
                out[f"{inverse[name]}_l{layer}{sfx}"] = np.ascontiguousarray(value[d].T)
    return out
