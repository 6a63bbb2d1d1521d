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

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

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


def _import_onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return onnx, helper, numpy_helper


def _onnx_gates(a: np.ndarray, hidden: int) -> np.ndarray:
    """Reorders the gate blocks of the last axis from ``r, z, n`` to ONNX's ``z, r, h``."""
    r, z, n = (a[..., i * hidden : (i + 1) * hidden] for i in range(3))
    return np.concatenate([z, r, n], axis=-1)


def _layer_tensors(lp, hidden: int) -> dict[str, np.ndarray]:
    """ONNX ``W (K, 3H, D)``, ``R (K, 3H, H)`` and, with biases, ``B (K, 6H)``, float32."""
    out = {
        "W": np.swapaxes(_onnx_gates(lp["w_ih"], hidden), 1, 2),
        "R": np.swapaxes(_onnx_gates(lp["w_hh"], hidden), 1, 2),
    }
    if "b_ih" in lp:
        out["B"] = np.concatenate(
            [_onnx_gates(lp["b_ih"], hidden), _onnx_gates(lp["b_hh"], hidden)], axis=-1
        )
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


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
    onnx, helper, numpy_helper = _import_onnx()
    tree = _params.unwrap(tree)
    if isinstance(tree, Mapping):
        tree = {
            k: {n: np.asarray(a) for n, a in lp.items()} if isinstance(lp, Mapping) else lp
            for k, lp in tree.items()
        }
    num_layers, num_dirs, in_features, hidden = _params.stack_dims(tree)
    opset = DEFAULT_OPSET if opset is None else opset
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(
            f"opset must be in [{MIN_OPSET}, {onnx.defs.onnx_opset_version()}] (the installed "
            f"onnx's newest); got {opset}"
        )

    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    f32, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    x_shape = ["B", "T", in_features] if batch_first else ["T", "B", in_features]
    out_shape = ["B", "T", num_dirs * hidden] if batch_first else ["T", "B", num_dirs * hidden]
    inputs = [helper.make_tensor_value_info("x", f32, x_shape)]
    if with_lengths:
        inputs.append(helper.make_tensor_value_info("lengths", i32, ["B"]))
    if with_h0:
        inputs.append(
            helper.make_tensor_value_info("h0", f32, [num_layers * num_dirs, "B", hidden])
        )
    outputs = [
        helper.make_tensor_value_info("output", f32, out_shape),
        helper.make_tensor_value_info("h_n", f32, [num_layers * num_dirs, "B", hidden]),
    ]

    def unsqueeze(a, axes, name):
        return node("Unsqueeze", [a, const(f"{name}.axes", np.array(axes, np.int64))], name)

    y = node("Transpose", ["x"], "x_tbd", perm=[1, 0, 2]) if batch_first else "x"
    seq_lens = ""
    if with_lengths:
        one, zero_i = const("one_i32", np.int32(1)), const("zero_i32", np.int32(0))
        t_i64 = node(
            "Gather", [node("Shape", [y], "x_shape"), const("zero_i64", np.int64(0))], "T_i64"
        )
        t_len = node("Cast", [t_i64], "T", to=i32)
        # What the GRU nodes see: lengths clipped to [1, T] (length 0 is patched up below).
        seq_lens = node("Min", [node("Max", ["lengths", one], "lengths_ge1"), t_len], "seq_lens")
        # valid (T, B, 1): t < lengths[b]; empty (1, B, 1): lengths[b] <= 0.
        steps = unsqueeze(node("Range", [zero_i, t_len, one], "steps"), [1], "steps_T1")
        valid = unsqueeze(node("Less", [steps, "lengths"], "valid_TB"), [2], "valid")
        empty = unsqueeze(node("LessOrEqual", ["lengths", zero_i], "empty_B"), [0, 2], "empty")
        zero_f = const("zero_f32", np.float32(0.0))
    finals = []
    for layer in range(num_layers):
        p = f"layer_{layer}"
        w = {k: const(f"{p}.{k}", v) for k, v in _layer_tensors(tree[p], hidden).items()}
        h_init = ""
        if with_h0:
            rows = {"start": layer * num_dirs, "end": (layer + 1) * num_dirs, "axis": 0}
            bounds = [const(f"{p}.h0_{k}", np.array([v], np.int64)) for k, v in rows.items()]
            h_init = node("Slice", ["h0", *bounds], f"{p}.h0")
        gru_inputs = [y, w["W"], w["R"], w.get("B", ""), seq_lens, h_init]
        while gru_inputs[-1] == "":
            gru_inputs.pop()
        nodes.append(
            helper.make_node(
                "GRU", gru_inputs, [f"{p}.Y", f"{p}.Y_h"], name=f"{p}.GRU", hidden_size=hidden,
                direction="bidirectional" if num_dirs == 2 else "forward",
                linear_before_reset=int(bool(reset_after)),
            )
        )  # fmt: skip
        # (T, K, B, H) -> (T, B, K, H) -> (T, B, K*H): both directions' features side by side.
        y_tbkh = node("Transpose", [f"{p}.Y"], f"{p}.Y_tbkh", perm=[0, 2, 1, 3])
        shape = const(f"{p}.out_shape", np.array([0, 0, num_dirs * hidden], np.int64))
        y = node("Reshape", [y_tbkh, shape], f"{p}.out")
        h_n = f"{p}.Y_h"
        if with_lengths:
            h_n = node("Where", [empty, h_init or zero_f, h_n], f"{p}.h_n")
        finals.append(h_n)

    if with_lengths:
        y = node("Where", [valid, y, zero_f], "output_tbf")
    if batch_first:
        node("Transpose", [y], "output", perm=[1, 0, 2])
    else:
        node("Identity", [y], "output")
    node("Concat", finals, "h_n", axis=0)

    import gru_jax

    graph = helper.make_graph(nodes, "gru_jax", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        producer_name="gru_jax",
        producer_version=gru_jax.__version__,
        ir_version=helper.find_min_ir_version_for(opsets),
        doc_string=(
            f"gru_jax GRU: {num_layers} layer(s), {num_dirs} direction(s), D={in_features}, "
            f"H={hidden}, reset_after={bool(reset_after)}, batch_first={bool(batch_first)}"
        ),
    )
    onnx.checker.check_model(model, full_check=True)
    return model
