"""Flax's own GRU cells <-> gru_jax cell trees (re-exported by :mod:`gru_jax.interop`).

* ``flax.linen.GRUCell``: :func:`from_flax_linen_gru_cell`, :func:`to_flax_linen_gru_cell`;
* ``flax.nnx.GRUCell``: :func:`from_flax_nnx_gru_cell`.

Every converter checks what it is given and raises ``ValueError`` rather than load part of it.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from gru_jax import _params

_LINEN_KEYS = {
    "ir": {"kernel", "bias"},
    "iz": {"kernel", "bias"},
    "in": {"kernel", "bias"},
    "hr": {"kernel"},
    "hz": {"kernel"},
    "hn": {"kernel", "bias"},
}


def _unwrap_flax(tree):
    tree = _params.unwrap(tree)
    if isinstance(tree, Mapping) and set(tree) == {"cell"}:  # nn.RNN(cell) params
        tree = tree["cell"]
    return tree


def _check_keys(tree, expected: dict, name: str) -> None:
    if not isinstance(tree, Mapping):
        raise ValueError(f"{name} must be a mapping; got {type(tree).__name__}")
    problems = []
    if set(tree) != set(expected):
        problems.append(f"keys {sorted(tree)}, expected {sorted(expected)}")
    for k in sorted(set(tree) & set(expected)):
        sub = tree[k]
        if not isinstance(sub, Mapping) or set(sub) != expected[k]:
            got = sorted(sub) if isinstance(sub, Mapping) else type(sub).__name__
            problems.append(f"{k}: keys {got}, expected {sorted(expected[k])}")
    if problems:
        raise ValueError(f"{name} is not a Flax GRUCell params tree: " + "; ".join(problems))


def from_flax_linen_gru_cell(params) -> dict:
    r"""Converts a ``flax.linen.GRUCell`` params tree into a gru_jax cell tree, exactly.

    Flax's linen cell has six ``Dense`` layers: ``ir``, ``iz``, ``in`` (kernel ``(D, H)`` and
    bias), ``hr``, ``hz`` (kernel ``(H, H)``, no bias) and ``hn`` (kernel and bias), and
    computes the reset-after cell ``n = tanh(x W_in + b_in + r (h W_hn + b_hn))``. The gates
    are concatenated in the order ``r, z, n`` and ``b_hr = b_hz = 0``, so the tree
    reproduces the Flax cell with ``reset_after=True`` (the default) when Flax used its
    default ``gate_fn=sigmoid`` and ``activation_fn=tanh``.

    Args:
      params: ``{"ir": {"kernel", "bias"}, ..., "hn": {"kernel", "bias"}}``; linen
        variables ``{"params": ...}`` and ``nn.RNN``'s ``{"cell": ...}`` are unwrapped.

    Returns:
      ``{"w_ih": (D, 3H), "w_hh": (H, 3H), "b_ih": (3H,), "b_hh": (3H,)}`` for
      :class:`gru_jax.GRUCell` / :class:`gru_jax.nnx.GRUCell`, or, through
      :func:`gru_jax.interop.stack_cells`, for :class:`gru_jax.GRU`.

    Raises:
      ValueError: on missing or extra entries or inconsistent shapes.
    """
    tree = _unwrap_flax(params)
    _check_keys(tree, _LINEN_KEYS, "params")
    a = {g: {k: jnp.asarray(v) for k, v in tree[g].items()} for g in _LINEN_KEYS}
    cell = {
        "w_ih": _concat_gates([a["ir"]["kernel"], a["iz"]["kernel"], a["in"]["kernel"]], "w_ih"),
        "w_hh": _concat_gates([a["hr"]["kernel"], a["hz"]["kernel"], a["hn"]["kernel"]], "w_hh"),
        "b_ih": _concat_gates([a["ir"]["bias"], a["iz"]["bias"], a["in"]["bias"]], "b_ih"),
    }
    b_hn = a["hn"]["bias"]
    zeros = jnp.zeros_like(b_hn)
    cell["b_hh"] = _concat_gates([zeros, zeros, b_hn], "b_hh")
    _params.cell_dims(cell, "converted Flax GRUCell params")
    return cell


def _concat_gates(arrays, name: str):
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(
            f"Flax GRUCell gates of {name} differ in shape: {[a.shape for a in arrays]}"
        )
    return jnp.concatenate(arrays, axis=-1)


def to_flax_linen_gru_cell(cell) -> dict:
    r"""Converts a gru_jax cell tree into ``flax.linen.GRUCell`` params.

    Flax's cell has no ``b_hr``/``b_hz`` (``hr``/``hz`` have no bias), so they are folded
    into ``ir``/``iz``'s biases: the function is the same (up to float rounding of the
    sum; exact when they are zero, as after :func:`from_flax_linen_gru_cell`). A cell
    without bias gets zero biases. Flax's cell is reset-after: only a tree used with
    ``reset_after=True`` keeps its meaning.

    Args:
      cell: ``{"w_ih": (D, 3H), "w_hh": (H, 3H), "b_ih": (3H,), "b_hh": (3H,)}`` (or
        wrapped as ``{"params": cell}``); e.g. ``gru_jax.cell_of(stack_tree, l, k)``.

    Returns:
      Flax's params, to use as ``nn.GRUCell(H).apply({"params": tree}, h, x)``, with
      ``tree`` = ``{"ir": {"kernel": (D, H), "bias": (H,)}, ..., "hn": {"kernel": (H, H),
      "bias": (H,)}}``.

    Raises:
      ValueError: if ``cell`` is not a cell tree.
    """
    cell = _params.unwrap(cell)
    _, hidden = _params.cell_dims(cell, "cell")
    dtype = cell["w_ih"].dtype
    w_ih = jnp.split(jnp.asarray(cell["w_ih"]), 3, axis=-1)
    w_hh = jnp.split(jnp.asarray(cell["w_hh"]), 3, axis=-1)
    if "b_ih" in cell:
        b_ih = jnp.split(jnp.asarray(cell["b_ih"]), 3)
        b_hh = jnp.split(jnp.asarray(cell["b_hh"]), 3)
    else:
        b_ih = b_hh = [jnp.zeros((hidden,), dtype)] * 3
    return {
        "ir": {"kernel": w_ih[0], "bias": b_ih[0] + b_hh[0]},
        "iz": {"kernel": w_ih[1], "bias": b_ih[1] + b_hh[1]},
        "in": {"kernel": w_ih[2], "bias": b_ih[2]},
        "hr": {"kernel": w_hh[0]},
        "hz": {"kernel": w_hh[1]},
        "hn": {"kernel": w_hh[2], "bias": b_hh[2]},
    }


def from_flax_nnx_gru_cell(cell_or_state) -> dict:
    r"""Converts a ``flax.nnx.GRUCell`` (flax 0.12) into a gru_jax cell tree, exactly.

    ``flax.nnx.GRUCell`` has one input ``Linear`` ``dense_i`` (kernel ``(D, 3H)`` and bias,
    gates ``r, z, n``) and one recurrent ``Linear`` ``dense_h`` (kernel ``(H, 3H)``, **no
    bias**). Its docstring shows ``n = tanh(W_in x + b_in + r (W_hn h + b_hn))``, but the
    code has no ``b_hn`` (nor ``b_hr``, ``b_hz``): it computes
    ``n = tanh(W_in x + b_in + r (W_hn h))``, a different function from
    ``flax.linen.GRUCell`` and ``torch.nn.GRUCell`` whenever their ``b_hn != 0``. The
    conversion sets ``b_hh = 0`` (hence ``b_hn = 0``), which reproduces that function
    exactly with ``reset_after=True``.

    Args:
      cell_or_state: a ``flax.nnx.GRUCell`` (its ``gate_fn``/``activation_fn`` must be the
        default sigmoid/tanh), its ``nnx.state(cell, nnx.Param)``, or that state's
        ``to_pure_dict()``: ``{"dense_i": {"kernel", "bias"}, "dense_h": {"kernel"}}``.

    Returns:
      ``{"w_ih": (D, 3H), "w_hh": (H, 3H), "b_ih": (3H,), "b_hh": (3H,) = 0}``.

    Raises:
      ValueError: on other activations, missing or extra entries, inconsistent shapes.
    """
    from flax import nnx  # Flax is a dependency; imported here to keep this module light.

    tree = cell_or_state
    if isinstance(tree, nnx.GRUCell):
        for attr, want in (("gate_fn", jax.nn.sigmoid), ("activation_fn", jnp.tanh)):
            if getattr(tree, attr) is not want:
                raise ValueError(f"nnx.GRUCell.{attr} must be the default {want.__name__}")
        tree = nnx.state(tree, nnx.Param)
    if isinstance(tree, nnx.State):
        tree = tree.to_pure_dict()
    tree = _unwrap_flax(tree)
    _check_keys(tree, {"dense_i": {"kernel", "bias"}, "dense_h": {"kernel"}}, "cell_or_state")
    b_ih = jnp.asarray(tree["dense_i"]["bias"])
    cell = {
        "w_ih": jnp.asarray(tree["dense_i"]["kernel"]),
        "w_hh": jnp.asarray(tree["dense_h"]["kernel"]),
        "b_ih": b_ih,
        "b_hh": jnp.zeros_like(b_ih),
    }
    _params.cell_dims(cell, "converted nnx.GRUCell params")
    return cell
