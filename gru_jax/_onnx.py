"""ONNX export: a stack params tree -> an ``onnx.ModelProto`` built on ONNX's own ``GRU``.

Each layer is one ``GRU`` node (``direction="bidirectional"`` when ``K = 2``); the weights are
stored as initializers, float32. ``onnx`` is imported only when :func:`to_onnx` is called (it
is an optional extra), so importing :mod:`gru_jax.interop` stays light.

Layout of ONNX's ``GRU`` (``layout=0``) and how gru_jax's tree maps onto it:

* ``X (T, B, D)``, ``Y (T, K, B, H)``, ``initial_h`` and ``Y_h (K, B, H)``;
* ``W (K, 3H, D)``, ``R (K, 3H, H)``: the transposes of ``w_ih (K, D, 3H)``,
  ``w_hh (K, H, 3H)``, with the gates reordered from gru_jax's ``r, z, n`` to ONNX's
  ``z, r, h``; ``B (K, 6H)`` is ``[b_ih; b_hh]`` reordered the same way;
* ``linear_before_reset=1`` is the reset-after cell (torch's), ``0`` the reset-before one;
* ``sequence_lens (B,)`` int32 gives packed-sequence semantics: the reverse direction of row
  ``b`` starts at step ``lengths[b] - 1``.

Around the nodes the graph sets what the operator leaves to the runtime, so that the results
are gru_jax's: padded steps of ``output`` are set to exactly 0 (``Where``); a row of length 0
gets ``h0`` (or zeros) as its ``h_n`` while its ``GRU`` nodes see length 1 (the operator does
not define length 0, and onnxruntime returns a zero ``Y_h`` for it); lengths are clipped to
``[0, T]`` as :func:`gru_jax.gru` clips traced lengths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

import gru_jax
from gru_jax import _params

if TYPE_CHECKING:
    import onnx

DEFAULT_OPSET = 21
"""Opset of :func:`to_onnx` by default: what ``onnx>=1.17`` and ``onnxruntime>=1.20`` share."""
MIN_OPSET = 14

_INSTALL_HINT = (
    "gru_jax.interop.to_onnx needs the optional package onnx (the 'onnx' extra, which also "
    "installs onnxruntime to run the models): "
    "pip install 'gru-jax[onnx] @ git+https://github.com/gru-jax/gru_jax' "
    "(or, from a clone: pip install -e '.[onnx]')"
)


def to_onnx(
    tree,
    *,
    reset_after: bool = True,
    batch_first: bool = True,
    with_lengths: bool = True,
    with_h0: bool = False,
    opset: int | None = None,
) -> onnx.ModelProto:
    """Exports a gru_jax GRU (a stack params tree) as an ONNX model of ``GRU`` nodes.

    The model computes ``gru_jax.gru(tree, x, h0, lengths=lengths, batch_first=batch_first,
    reset_after=reset_after)`` in float32, with symbolic batch ``B`` and time ``T``.

    Graph inputs, in this order (ONNX runtimes need every graph input fed, so the optional
    ones are chosen at export time):

    * ``x``: float32 ``(B, T, D)``, or ``(T, B, D)`` when not ``batch_first``;
    * ``lengths`` (only with ``with_lengths``): int32 ``(B,)``, packed-sequence lengths as in
      :func:`gru_jax.gru`; values are clipped to ``[0, T]``;
    * ``h0`` (only with ``with_h0``): float32 ``(L*K, B, H)``, index ``l*K + k``; without it
      the initial states are zeros.

    Graph outputs:

    * ``output``: float32 ``(B, T, K*H)`` (``(T, B, K*H)`` when not ``batch_first``), exactly
      0 at steps ``t >= lengths[b]``;
    * ``h_n``: float32 ``(L*K, B, H)``; ``h0`` (or zeros) for a row of length 0.

    Args:
      tree: a stack params tree ``{"layer_l": {"w_ih": (K, D, 3H), "w_hh": (K, H, 3H),
        "b_ih": (K, 3H), "b_hh": (K, 3H)}}`` (``{"params": tree}`` is also accepted). Any
        float dtype; the model stores float32.
      reset_after: the cell the tree was trained with (``linear_before_reset=1`` when True).
      batch_first: layout of ``x`` and ``output``.
      with_lengths: add the ``lengths`` input.
      with_h0: add the ``h0`` input.
      opset: the default ONNX opset's version, at least 14; ``None``: ``DEFAULT_OPSET`` (21).

    Returns:
      An ``onnx.ModelProto`` that passes ``onnx.checker.check_model``.

    Raises:
      ImportError: if ``onnx`` is not installed (the message says how to install it).
      ValueError: on a malformed params tree, or an ``opset`` out of range.
    """
    graph = _Graph.new()
    tree = _numpy_tree(tree)
    dims = _Dims(*_params.stack_dims(tree))
    opset = _checked_opset(graph.onnx, opset)
    inputs, outputs = _graph_io(graph, dims, batch_first, with_lengths, with_h0)
    y = graph.node("Transpose", ["x"], "x_tbd", perm=[1, 0, 2]) if batch_first else "x"
    masks = _length_masks(graph, y) if with_lengths else None
    finals = []
    for layer in range(dims.layers):
        y, h_n = _layer_nodes(graph, layer, tree[f"layer_{layer}"], y, with_h0, masks, reset_after)
        finals.append(h_n)
    _output_nodes(graph, y, finals, masks, batch_first)
    doc = (
        f"gru_jax GRU: {dims.layers} layer(s), {dims.directions} direction(s), "
        f"D={dims.in_features}, H={dims.hidden}, reset_after={bool(reset_after)}, "
        f"batch_first={bool(batch_first)}"
    )
    return _model(graph, inputs, outputs, opset, doc)


def _import_onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return onnx, helper, numpy_helper


class _Dims(NamedTuple):
    """``L, K, D, H`` of the exported stack."""

    layers: int
    directions: int
    in_features: int
    hidden: int


class _Masks(NamedTuple):
    """The names of what :func:`_length_masks` adds, for the layers and the output."""

    seq_lens: str  # (B,) int32: lengths clipped to [1, T], what the GRU nodes see
    valid: str  # (T, B, 1) bool: t < lengths[b]
    empty: str  # (1, B, 1) bool: lengths[b] <= 0
    zero: str  # float32 0, written at padded steps and as the h_n of empty rows


@dataclasses.dataclass
class _Graph:
    """The nodes and initializers of a graph in the making, kept in the order they are added.

    Every node has one output, named as the node; :meth:`const` and :meth:`node` return that
    name, so that the steps of :func:`to_onnx` read as expressions.
    """

    onnx: Any
    helper: Any
    numpy_helper: Any
    nodes: list = dataclasses.field(default_factory=list)
    initializers: list = dataclasses.field(default_factory=list)

    @classmethod
    def new(cls) -> _Graph:
        """An empty graph; raises ``ImportError`` (saying how to install onnx) without onnx."""
        return cls(*_import_onnx())

    def const(self, name: str, value) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def unsqueeze(self, a: str, axes: list[int], name: str) -> str:
        return self.node(
            "Unsqueeze", [a, self.const(f"{name}.axes", np.array(axes, np.int64))], name
        )


def _numpy_tree(tree) -> dict:
    """The stack tree (unwrapped from ``{"params": tree}``) with NumPy leaves; anything else
    is returned as it is, for :func:`gru_jax._params.stack_dims` to refuse with its message."""
    tree = _params.unwrap(tree)
    if not isinstance(tree, Mapping):
        return tree
    return {
        k: {n: np.asarray(a) for n, a in lp.items()} if isinstance(lp, Mapping) else lp
        for k, lp in tree.items()
    }


def _checked_opset(onnx, opset: int | None) -> int:
    opset = DEFAULT_OPSET if opset is None else opset
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(
            f"opset must be in [{MIN_OPSET}, {newest}] (the installed onnx's newest); got {opset}"
        )
    return opset


def _graph_io(graph: _Graph, dims: _Dims, batch_first, with_lengths, with_h0):
    """The graph's inputs ``x[, lengths][, h0]`` and outputs ``output, h_n`` (value infos)."""
    f32, i32 = graph.onnx.TensorProto.FLOAT, graph.onnx.TensorProto.INT32
    info = graph.helper.make_tensor_value_info
    features = dims.directions * dims.hidden
    x_shape = ["B", "T", dims.in_features] if batch_first else ["T", "B", dims.in_features]
    out_shape = ["B", "T", features] if batch_first else ["T", "B", features]
    states = [dims.layers * dims.directions, "B", dims.hidden]
    inputs = [info("x", f32, x_shape)]
    if with_lengths:
        inputs.append(info("lengths", i32, ["B"]))
    if with_h0:
        inputs.append(info("h0", f32, states))
    return inputs, [info("output", f32, out_shape), info("h_n", f32, states)]


def _length_masks(graph: _Graph, y: str) -> _Masks:
    """The nodes that turn the ``lengths`` input into what the layers and the output need.

    ONNX's ``GRU`` does not define length 0 (onnxruntime returns a zero ``Y_h`` for it), so
    its nodes see lengths clipped to ``[1, T]`` and the empty rows are patched up after.
    """
    one, zero_i = graph.const("one_i32", np.int32(1)), graph.const("zero_i32", np.int32(0))
    shape = graph.node("Shape", [y], "x_shape")
    t_i64 = graph.node("Gather", [shape, graph.const("zero_i64", np.int64(0))], "T_i64")
    t_len = graph.node("Cast", [t_i64], "T", to=graph.onnx.TensorProto.INT32)
    at_least_one = graph.node("Max", ["lengths", one], "lengths_ge1")
    seq_lens = graph.node("Min", [at_least_one, t_len], "seq_lens")
    steps = graph.unsqueeze(graph.node("Range", [zero_i, t_len, one], "steps"), [1], "steps_T1")
    valid = graph.unsqueeze(graph.node("Less", [steps, "lengths"], "valid_TB"), [2], "valid")
    empty_b = graph.node("LessOrEqual", ["lengths", zero_i], "empty_B")
    empty = graph.unsqueeze(empty_b, [0, 2], "empty")
    return _Masks(seq_lens, valid, empty, graph.const("zero_f32", np.float32(0.0)))


def _layer_h0(graph: _Graph, layer: int, directions: int) -> str:
    """Rows ``l*K .. l*K + K - 1`` of the ``h0`` input: this layer's initial states."""
    rows = {"start": layer * directions, "end": (layer + 1) * directions, "axis": 0}
    bounds = [
        graph.const(f"layer_{layer}.h0_{k}", np.array([v], np.int64)) for k, v in rows.items()
    ]
    return graph.node("Slice", ["h0", *bounds], f"layer_{layer}.h0")


def _layer_nodes(graph: _Graph, layer: int, lp, y: str, with_h0: bool, masks, reset_after):
    """One layer: its ``GRU`` node over ``y (T, B, D_l)``; returns its output ``(T, B, K*H)``
    and its ``h_n (K, B, H)`` (its ``h0`` rows, or 0, for empty rows when there are lengths)."""
    p = f"layer_{layer}"
    directions, hidden = lp["w_hh"].shape[:2]
    w = {k: graph.const(f"{p}.{k}", v) for k, v in _onnx_weights(lp).items()}
    h_init = _layer_h0(graph, layer, directions) if with_h0 else ""
    seq_lens = masks.seq_lens if masks is not None else ""
    gru_inputs = [y, w["W"], w["R"], w.get("B", ""), seq_lens, h_init]
    while gru_inputs[-1] == "":  # trailing optional inputs are left out, not named ""
        gru_inputs.pop()
    graph.nodes.append(
        graph.helper.make_node(
            "GRU", gru_inputs, [f"{p}.Y", f"{p}.Y_h"], name=f"{p}.GRU", hidden_size=hidden,
            direction="bidirectional" if directions == 2 else "forward",
            linear_before_reset=int(bool(reset_after)),
        )
    )  # fmt: skip
    # (T, K, B, H) -> (T, B, K, H) -> (T, B, K*H): both directions' features side by side.
    y_tbkh = graph.node("Transpose", [f"{p}.Y"], f"{p}.Y_tbkh", perm=[0, 2, 1, 3])
    shape = graph.const(f"{p}.out_shape", np.array([0, 0, directions * hidden], np.int64))
    y = graph.node("Reshape", [y_tbkh, shape], f"{p}.out")
    h_n = f"{p}.Y_h"
    if masks is not None:
        h_n = graph.node("Where", [masks.empty, h_init or masks.zero, h_n], f"{p}.h_n")
    return y, h_n


def _onnx_weights(lp) -> dict[str, np.ndarray]:
    """ONNX ``W (K, 3H, D)``, ``R (K, 3H, H)`` and, with biases, ``B (K, 6H)``, float32."""
    out = {
        "W": np.swapaxes(_params.reorder_gates(lp["w_ih"], _params.ZRH), 1, 2),
        "R": np.swapaxes(_params.reorder_gates(lp["w_hh"], _params.ZRH), 1, 2),
    }
    if "b_ih" in lp:
        biases = [_params.reorder_gates(lp[b], _params.ZRH) for b in ("b_ih", "b_hh")]
        out["B"] = np.concatenate(biases, axis=-1)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def _output_nodes(graph: _Graph, y: str, finals: list[str], masks, batch_first: bool) -> None:
    """The graph outputs: ``output`` (padded steps set to 0, in ``x``'s layout) and ``h_n``."""
    if masks is not None:
        y = graph.node("Where", [masks.valid, y, masks.zero], "output_tbf")
    if batch_first:
        graph.node("Transpose", [y], "output", perm=[1, 0, 2])
    else:
        graph.node("Identity", [y], "output")
    graph.node("Concat", finals, "h_n", axis=0)


def _model(graph: _Graph, inputs, outputs, opset: int, doc: str) -> onnx.ModelProto:
    """The checked model around the graph's nodes and initializers."""
    helper = graph.helper
    body = helper.make_graph(graph.nodes, "gru_jax", inputs, outputs, graph.initializers)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        body,
        opset_imports=opsets,
        producer_name="gru_jax",
        producer_version=gru_jax.__version__,
        ir_version=helper.find_min_ir_version_for(opsets),
        doc_string=doc,
    )
    graph.onnx.checker.check_model(model, full_check=True)
    return model
