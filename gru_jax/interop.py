"""Weights in and out: torch, Keras 3 and Flax GRUs <-> gru_jax params trees.

* torch ``nn.GRU``/``nn.GRUCell`` state dicts: :func:`from_torch`, :func:`to_torch`;
* Keras 3 ``layers.GRU`` / ``layers.Bidirectional(GRU)``: :func:`from_keras`;
* ``flax.linen.GRUCell``: :func:`from_flax_linen_gru_cell`, :func:`to_flax_linen_gru_cell`;
  ``flax.nnx.GRUCell``: :func:`from_flax_nnx_gru_cell`;
* cell trees -> a stack tree: :func:`stack_cells`;
* a stack tree -> an ONNX model of ``GRU`` nodes: :func:`to_onnx` (needs the ``onnx`` extra,
  imported only when called).

Every converter checks what it is given and raises ``ValueError`` rather than load part of it.

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

from gru_jax import _params
from gru_jax._flax_cells import (
    from_flax_linen_gru_cell,
    from_flax_nnx_gru_cell,
    to_flax_linen_gru_cell,
)
from gru_jax._onnx import to_onnx

__all__ = [
    "from_flax_linen_gru_cell",
    "from_flax_nnx_gru_cell",
    "from_keras",
    "from_torch",
    "stack_cells",
    "to_flax_linen_gru_cell",
    "to_onnx",
    "to_torch",
]

_CELL_NAMES = {"weight_ih": "w_ih", "weight_hh": "w_hh", "bias_ih": "b_ih", "bias_hh": "b_hh"}
_GRU_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)(_reverse)?$")
# A GRU's or GRUCell's entry in a bigger model's state dict: group 1 is its submodule's prefix.
_PREFIXED_KEY = re.compile(r"^(.+\.)(?:weight|bias)_(?:ih|hh)(?:_l\d+(?:_reverse)?)?$")


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def from_torch(state_dict, *, prefix: str = "") -> dict:
    """Converts a torch ``nn.GRU`` or ``nn.GRUCell`` state dict into a gru_jax params tree.

    Args:
      state_dict: a mapping from torch parameter names to tensors or NumPy arrays, as
        ``torch.nn.GRU(...).state_dict()`` returns (a module with ``.state_dict()`` is also
        accepted). ``nn.GRU`` names: ``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
        ``bias_hh_l0`` and ``*_reverse``; ``nn.GRUCell`` names: ``weight_ih``, ``weight_hh``,
        ``bias_ih``, ``bias_hh``.
      prefix: a prefix to strip (and select by), e.g. ``"encoder.gru."`` for a submodule of a
        bigger model's state dict: ``from_torch(model.state_dict(), prefix="gru.")`` for a
        model whose GRU is its attribute ``gru`` (the error for a bigger model's state dict
        names the prefixes it found).

    Returns:
      A params tree, whose arrays keep the torch dtype. For ``nn.GRU`` a stack tree
      ``{"layer_l": {"w_ih": (K, D_l, 3H), "w_hh": (K, H, 3H), "b_ih": (K, 3H),
      "b_hh": (K, 3H)}}``, for ``GRU(...).apply({"params": tree}, ...)``; for ``nn.GRUCell``
      a cell tree ``{"w_ih": (D, 3H), "w_hh": (H, 3H), "b_ih": (3H,), "b_hh": (3H,)}``.

    Raises:
      ValueError: on missing, unexpected or inconsistently shaped entries.
    """
    if hasattr(state_dict, "state_dict") and not isinstance(state_dict, Mapping):
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping; got {type(state_dict).__name__}")
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(
            f"state_dict has no entries with prefix {prefix!r}" + _prefix_hint(state_dict)
        )
    if set(sd) <= set(_CELL_NAMES):
        return _cell_from_torch(sd)
    return _gru_from_torch(sd)


def _prefix_hint(keys) -> str:
    """What to pass as ``prefix`` when ``keys`` are a bigger model's, with a GRU (or GRUCell)
    inside: its entries are named ``"<submodule>.weight_ih_l0"``, ... ("" when there is none)."""
    prefixes = sorted({m.group(1) for k in keys if (m := _PREFIXED_KEY.match(k))})
    if not prefixes:
        return ""
    return (
        f"; GRU entries start with {', '.join(map(repr, prefixes))}: pass the one to read as "
        f"prefix, e.g. from_torch(state_dict, prefix={prefixes[0]!r})"
    )


def _cell_from_torch(sd) -> dict:
    missing = {"weight_ih", "weight_hh"} - set(sd)
    if ("bias_ih" in sd) != ("bias_hh" in sd):
        missing |= {"bias_ih", "bias_hh"} - set(sd)
    if missing:
        raise ValueError(f"torch GRUCell state_dict is missing {sorted(missing)}")
    cell = {_CELL_NAMES[k]: jnp.asarray(_to_numpy(v).T) for k, v in sd.items()}
    _params.cell_dims(cell, "converted GRUCell params")
    return cell


def _gru_from_torch(sd) -> dict:
    unexpected = sorted(k for k in sd if not _GRU_KEY.match(k))
    if unexpected:
        raise ValueError(
            f"unexpected keys in torch GRU state_dict: {unexpected}" + _prefix_hint(unexpected)
        )
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
    for (layer, d, n), value in parsed.items():
        if d == 1 and value.shape != parsed[(layer, 0, n)].shape:
            raise ValueError(
                f"torch GRU state_dict has inconsistent shapes: {n}_l{layer}_reverse is "
                f"{value.shape} but {n}_l{layer} is {parsed[(layer, 0, n)].shape}"
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
        _params.stack_dims(params)
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
      ``(3H, D)``, ...) as fresh writable C-contiguous copies, ready for
      ``torch.nn.GRU(...).load_state_dict`` after
      ``torch.from_numpy``, or to compare gradients with ``param.grad``.

    Raises:
      ValueError: if the tree is neither layout.
    """
    tree = _params.unwrap(tree)
    if not isinstance(tree, Mapping):
        raise ValueError(f"expected a params tree mapping; got {type(tree).__name__}")
    inverse = {v: k for k, v in _CELL_NAMES.items()}
    if "w_ih" in tree:
        _params.cell_dims(tree, "tree")
        return {inverse[k]: np.array(np.asarray(v).T, order="C") for k, v in tree.items()}
    _, num_dirs, _, _ = _params.stack_dims(tree)
    out = {}
    for layer in range(len(tree)):
        for name, value in tree[f"layer_{layer}"].items():
            value = np.asarray(value)
            for d in range(num_dirs):
                sfx = "_reverse" if d == 1 else ""
                out[f"{inverse[name]}_l{layer}{sfx}"] = np.array(value[d].T, order="C")
    return out


def stack_cells(layers) -> dict:
    """Builds a stack params tree from cell trees, one per layer (and direction).

    Args:
      layers: a sequence with, per layer, a cell tree ``{"w_ih": (D, 3H), ...}`` or a pair
        ``(forward, reverse)`` of cell trees for a bidirectional layer.

    Returns:
      ``{"layer_l": {"w_ih": (K, D_l, 3H), ...}}``; :func:`gru_jax.cell_of` is the inverse.

    Raises:
      ValueError: if the cells disagree in directions, bias, or shapes.
    """
    if isinstance(layers, Mapping) or not len(layers):
        raise ValueError("layers must be a non-empty sequence of cell trees or (fwd, rev) pairs")
    params = {}
    for i, layer in enumerate(layers):
        cells = list(layer) if isinstance(layer, (list, tuple)) else [layer]
        if len(cells) not in (1, 2):
            raise ValueError(f"layers[{i}] must be a cell or a (forward, reverse) pair")
        for k, cell in enumerate(cells):
            _params.cell_dims(cell, f"layers[{i}][{k}]")
        keys = [set(c) for c in cells]
        if any(k != keys[0] for k in keys):
            raise ValueError(f"layers[{i}]: both directions must have the same keys; got {keys}")
        params[f"layer_{i}"] = {
            n: jnp.stack([jnp.asarray(c[n]) for c in cells]) for n in sorted(keys[0])
        }
    biased = {"b_ih" in lp for lp in params.values()}
    if len(biased) != 1:
        raise ValueError("either every layer or no layer must have biases")
    try:
        _params.stack_dims(params)
    except ValueError as err:
        raise ValueError(f"layers do not form a stack: {err}") from None
    return params


# --------------------------------------------------------------------------------------------
# Keras 3
# --------------------------------------------------------------------------------------------


def _keras_cell(weights, where: str) -> tuple[dict, bool | None]:
    """One Keras GRU's ``[kernel, recurrent_kernel(, bias)]`` -> (cell tree, reset_after)."""
    weights = [np.asarray(w) for w in weights]
    if len(weights) not in (2, 3):
        raise ValueError(
            f"{where}: expected [kernel, recurrent_kernel] or [kernel, recurrent_kernel, bias]; "
            f"got {len(weights)} arrays"
        )
    kernel, recurrent = weights[0], weights[1]
    if recurrent.ndim != 2 or recurrent.shape[1] != 3 * recurrent.shape[0]:
        raise ValueError(f"{where}: recurrent_kernel must be (H, 3H); got {recurrent.shape}")
    hidden = recurrent.shape[0]
    if kernel.ndim != 2 or kernel.shape[1] != 3 * hidden:
        raise ValueError(f"{where}: kernel must be (D, 3H) = (D, {3 * hidden}); got {kernel.shape}")
    cell = {"w_ih": _params.reorder_gates(kernel, _params.ZRH)}
    cell["w_hh"] = _params.reorder_gates(recurrent, _params.ZRH)
    reset_after = None
    if len(weights) == 3:
        bias = weights[2]
        if bias.shape not in ((2, 3 * hidden), (3 * hidden,)):
            raise ValueError(
                f"{where}: bias must be (2, 3H) (reset_after=True) or (3H,) (reset_after=False) "
                f"with 3H = {3 * hidden}; got {bias.shape}"
            )
        bias = _params.reorder_gates(bias, _params.ZRH)
        # reset_after=True: [input bias, recurrent bias]; False: one bias, on the input side.
        reset_after = bias.ndim == 2
        cell["b_ih"], cell["b_hh"] = (
            (bias[0], bias[1]) if reset_after else (bias, np.zeros_like(bias))
        )
    return {k: jnp.asarray(v) for k, v in cell.items()}, reset_after


def _keras_weights(cell) -> list[np.ndarray]:
    """A cell tree as one Keras ``layers.GRU(reset_after=True)``'s ``get_weights()`` list,
    ``[kernel (D, 3H), recurrent_kernel (H, 3H)(, bias (2, 3H))]``: the inverse of
    :func:`_keras_cell`, for the benchmark's Keras peer (gru_jax has no ``to_keras``)."""
    weights = [_params.reorder_gates(cell[k], _params.ZRH) for k in ("w_ih", "w_hh")]
    if "b_ih" in cell:
        weights.append(
            np.stack([_params.reorder_gates(cell[k], _params.ZRH) for k in ("b_ih", "b_hh")])
        )
    return weights


def _keras_gru_layer(layer, where: str, *, backward: bool = False):
    """Validates a Keras ``layers.GRU`` and returns (cell tree, reset_after)."""
    import keras  # The caller holds a Keras layer, so Keras is importable.

    if not isinstance(layer, keras.layers.GRU):
        raise ValueError(
            f"{where}: expected a keras.layers.GRU or keras.layers.Bidirectional(GRU); "
            f"got {type(layer).__name__}"
        )
    if not layer.built or not layer.weights:
        raise ValueError(f"{where}: the Keras layer is not built; call it on an input first")
    cell = layer.cell
    if cell.activation is not keras.activations.tanh:
        raise ValueError(f"{where}: activation must be tanh; got {cell.activation.__name__}")
    if cell.recurrent_activation is not keras.activations.sigmoid:
        raise ValueError(
            f"{where}: recurrent_activation must be sigmoid; "
            f"got {cell.recurrent_activation.__name__}"
        )
    if bool(layer.go_backwards) != backward:
        raise ValueError(
            f"{where}: go_backwards={layer.go_backwards} is not supported here "
            + (
                "(the reverse layer of a Bidirectional must have go_backwards=True)"
                if backward
                else "(a go_backwards GRU equals gru_jax on the time-reversed input with the "
                "output reversed; convert it with go_backwards=False weights: "
                "from_keras(layer.get_weights()))"
            )
        )
    tree, reset_after = _keras_cell(layer.get_weights(), where)
    if reset_after is not None and reset_after != bool(layer.reset_after):
        raise ValueError(f"{where}: bias shape disagrees with reset_after={layer.reset_after}")
    return tree, bool(layer.reset_after)


def _keras_layer(layer, where: str) -> tuple[list, bool]:
    """A Keras GRU or Bidirectional(GRU) -> ([cell] or [fwd, rev], reset_after)."""
    import keras

    if isinstance(layer, keras.layers.Bidirectional):
        if layer.merge_mode not in ("concat", None):
            raise ValueError(
                f"{where}: Bidirectional merge_mode={layer.merge_mode!r} cannot be expressed by "
                "gru_jax, whose output concatenates the directions; use merge_mode='concat' "
                "(or None) and merge gru_jax's output[..., :H] and output[..., H:] yourself"
            )
        fwd, ra_f = _keras_gru_layer(layer.forward_layer, f"{where}.forward_layer")
        rev, ra_r = _keras_gru_layer(layer.backward_layer, f"{where}.backward_layer", backward=True)
        if ra_f != ra_r:
            raise ValueError(f"{where}: forward and backward layers differ in reset_after")
        return [fwd, rev], ra_f
    cell, reset_after = _keras_gru_layer(layer, where)
    return [cell], reset_after


def from_keras(layer_or_weights) -> dict:
    r"""Converts a Keras 3 ``GRU`` / ``Bidirectional(GRU)`` into a gru_jax stack params tree.

    Keras stores ``kernel (D, 3H)``, ``recurrent_kernel (H, 3H)`` in gate order ``z, r, h``
    (ours: ``r, z, n``; ``h`` is our ``n``) and a bias of shape ``(2, 3H)`` (input and
    recurrent bias) when ``reset_after=True``, ``(3H,)`` (input side only) when
    ``reset_after=False``. The kernels are reordered; with ``reset_after=False`` the tree
    gets ``b_hh = 0``. Keras's ``h_t = z h_{t-1} + (1 - z) \tilde h`` is ours. The result
    reproduces the layer exactly when the gru_jax model is built with
    ``reset_after=layer.reset_after`` and ``bias=layer.use_bias`` (the tree does not
    carry ``reset_after``: pass it). Keras is batch-major, as gru_jax's default
    ``batch_first=True``.

    Keras outputs in terms of ``output, h_n = gru_jax.gru(tree, x, h0, lengths=...)``:

    * ``GRU(return_sequences=True)``: ``output``; ``return_sequences=False``:
      ``h_n[-1]`` (the last valid step's output); ``return_state=True`` adds
      ``h_n[-1]``; ``initial_state=[h]`` is ``h0=h[None]``.
    * ``Bidirectional(GRU(...), merge_mode="concat")``: ``output``
      (``return_sequences=False``: ``concat([h_n[-2], h_n[-1]], -1)``); the states it
      returns are ``h_n[-2]`` (forward) and ``h_n[-1]`` (backward). ``merge_mode=None``
      returns ``[output[..., :H], output[..., H:]]``.
    * A right-padded Keras mask (``mask[b, t] = t < lengths[b]``) is ``lengths``: states and
      valid outputs agree; gru_jax's output is zero at padded steps.

    Args:
      layer_or_weights: a built ``keras.layers.GRU`` or ``keras.layers.Bidirectional``
        wrapping one; a sequence of such layers (a stack whose layers feed each other, each
        but the last with ``return_sequences=True``); or the list ``layer.get_weights()``
        returns: ``[kernel, recurrent_kernel(, bias)]`` for a GRU, twice that (forward then
        backward) for a Bidirectional.

    Returns:
      A stack params tree, as :func:`from_torch` returns (no biases when
      ``use_bias=False``), ``{"layer_l": {"w_ih": (K, D_l, 3H), "w_hh": (K, H, 3H),
      "b_ih": (K, 3H), "b_hh": (K, 3H)}}``.

    Raises:
      ValueError: a layer that is not a GRU (or Bidirectional GRU); an unbuilt layer; a
        ``merge_mode`` other than ``"concat"``/``None``; activations other than
        tanh/sigmoid; a stand-alone ``go_backwards`` GRU; weights of the wrong number or
        shape; stacked layers that disagree in ``reset_after``, bias or sizes.
    """
    if hasattr(layer_or_weights, "get_weights"):
        cells, _ = _keras_layer(layer_or_weights, "layer")
        return stack_cells([cells])
    if isinstance(layer_or_weights, Mapping) or not isinstance(layer_or_weights, (list, tuple)):
        raise ValueError(
            "from_keras expects a Keras GRU/Bidirectional layer, a list of them, or a "
            f"get_weights() list; got {type(layer_or_weights).__name__}"
        )
    items = list(layer_or_weights)
    if items and all(hasattr(item, "get_weights") for item in items):
        layers, modes = [], set()
        for i, layer in enumerate(items):
            cells, reset_after = _keras_layer(layer, f"layers[{i}]")
            layers.append(cells)
            modes.add(reset_after)
        if len(modes) > 1:
            raise ValueError("stacked Keras layers must all have the same reset_after")
        return stack_cells(layers)
    if len(items) in (2, 3):
        cell, _ = _keras_cell(items, "weights")
        return stack_cells([[cell]])
    if len(items) in (4, 6):
        half = len(items) // 2
        fwd, ra_f = _keras_cell(items[:half], "weights (forward)")
        rev, ra_r = _keras_cell(items[half:], "weights (backward)")
        if ra_f != ra_r:
            raise ValueError("forward and backward weights differ in reset_after (bias shape)")
        return stack_cells([[fwd, rev]])
    raise ValueError(
        "a get_weights() list must have 2 or 3 arrays (GRU) or 4 or 6 (Bidirectional); "
        f"got {len(items)}"
    )
