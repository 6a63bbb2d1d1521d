"""ONNX export (:func:`gru_jax.interop.to_onnx`): checked by onnx, run in onnxruntime on the CPU,
compared with :func:`gru_jax.gru` (outputs and ``h_n``, float32)."""

import subprocess
import sys

import jax
import numpy as np
import pytest

import gru_jax
from gru_jax.interop import to_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

D, H = 3, 4
TOL = 1e-5


def _params(num_layers, bidirectional, bias=True, seed=0):
    return gru_jax.init_gru(
        jax.random.key(seed), D, H, num_layers=num_layers, bidirectional=bidirectional, bias=bias
    )


def _session(model):
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _inputs(rng, batch, steps, lengths, states, batch_first, with_h0):
    """Feeds for the model; padded steps hold NaN and inf, which must never be read."""
    x = rng.standard_normal((batch, steps, D)).astype(np.float32)
    feeds = {}
    if lengths is not None:
        lengths = np.asarray(lengths, np.int32)
        for b, n in enumerate(lengths):
            x[b, n:] = np.nan if b % 2 else np.inf
        feeds["lengths"] = lengths
    feeds["x"] = x if batch_first else np.ascontiguousarray(x.transpose(1, 0, 2))
    if with_h0:
        feeds["h0"] = rng.standard_normal((states, batch, H)).astype(np.float32)
    return feeds


# (layers, bidirectional, bias, reset_after, batch_first, with_lengths, with_h0, runs): each
# run is (B, T, lengths) on the same model; lengths of 0 and of T, and two batch sizes and
# times for one model (symbolic B and T).
CASES = {
    "1x1-lengths": (1, False, True, True, True, True, False, [(4, 5, [5, 0, 2, 1])]),
    "2x2-lengths-h0": (
        2, True, True, True, True, True, True, [(3, 5, [5, 0, 2]), (2, 7, [1, 7])],
    ),
    "2x1-nobias-reset_before-time_major": (
        2, False, False, False, False, True, True, [(3, 6, [2, 6, 0])],
    ),
    "1x2-full-reset_before-time_major": (1, True, True, False, False, False, False, [(2, 4, None)]),
    "2x2-full-h0": (2, True, False, True, True, False, True, [(3, 4, None)]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_matches_gru(case):
    layers, bidir, bias, reset_after, batch_first, with_lengths, with_h0, runs = CASES[case]
    params = _params(layers, bidir, bias)
    model = to_onnx(
        params, reset_after=reset_after, batch_first=batch_first, with_lengths=with_lengths,
        with_h0=with_h0,
    )  # fmt: skip
    sess = _session(model)
    names = ["x"] + ["lengths"] * with_lengths + ["h0"] * with_h0
    assert [i.name for i in sess.get_inputs()] == names
    k = 2 if bidir else 1
    rng = np.random.default_rng(1)
    for batch, steps, lengths in runs:
        feeds = _inputs(rng, batch, steps, lengths, layers * k, batch_first, with_h0)
        out, h_n = sess.run(["output", "h_n"], feeds)
        ref_out, ref_h = gru_jax.gru(
            params, feeds["x"], feeds.get("h0"), lengths=feeds.get("lengths"),
            batch_first=batch_first, reset_after=reset_after,
        )  # fmt: skip
        want_out = (batch, steps, k * H) if batch_first else (steps, batch, k * H)
        assert out.shape == want_out and h_n.shape == (layers * k, batch, H)
        np.testing.assert_allclose(out, ref_out, rtol=TOL, atol=TOL)
        np.testing.assert_allclose(h_n, ref_h, rtol=TOL, atol=TOL)
        if lengths is not None:
            out_bt = out if batch_first else out.transpose(1, 0, 2)
            for b, n in enumerate(lengths):
                assert np.all(out_bt[b, n:] == 0.0)  # exactly zero, not just close
                assert np.all(np.isfinite(out_bt[b, :n]))
                if n == 0:  # h_n of an empty row is its h0 (zeros without h0), bit for bit
                    want_h = feeds["h0"][:, b] if with_h0 else np.zeros((layers * k, H))
                    np.testing.assert_array_equal(h_n[:, b], want_h)


def test_graph_layout():
    model = to_onnx(_params(2, True), with_h0=True)
    onnx.checker.check_model(model, full_check=True)
    graph = model.graph

    def dims(value_info):
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    assert {i.name: dims(i) for i in graph.input} == {
        "x": ["B", "T", D], "lengths": ["B"], "h0": [4, "B", H],
    }  # fmt: skip
    assert {o.name: dims(o) for o in graph.output} == {
        "output": ["B", "T", 2 * H],
        "h_n": [4, "B", H],
    }
    grus = [n for n in graph.node if n.op_type == "GRU"]
    assert len(grus) == 2
    for n in grus:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"hidden_size": H, "direction": b"bidirectional", "linear_before_reset": 1}
        assert len(n.input) == 6  # X, W, R, B, sequence_lens, initial_h
    assert [o.version for o in model.opset_import] == [21]
    assert model.ir_version == 10
    inits = {i.name: tuple(i.dims) for i in graph.initializer}
    assert inits["layer_0.W"] == (2, 3 * H, D)
    assert inits["layer_1.W"] == (2, 3 * H, 2 * H)
    assert inits["layer_1.R"] == (2, 3 * H, H)
    assert inits["layer_1.B"] == (2, 6 * H)


def test_gate_order_and_save_load(tmp_path):
    """The weights are gru_jax's transposed with gates z, r, h; a saved model runs the same."""
    params = _params(1, True)
    model = to_onnx(params, with_lengths=False, opset=22)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    w_ih = np.asarray(params["layer_0"]["w_ih"])
    r, z, n = (w_ih[:, :, i * H : (i + 1) * H] for i in range(3))
    np.testing.assert_array_equal(inits["layer_0.W"], np.concatenate([z, r, n], -1).swapaxes(1, 2))
    b_ih, b_hh = (np.asarray(params["layer_0"][k]) for k in ("b_ih", "b_hh"))
    assert inits["layer_0.B"][:, 2 * H : 3 * H].tolist() == b_ih[:, 2 * H :].tolist()
    assert inits["layer_0.B"][:, 3 * H : 4 * H].tolist() == b_hh[:, H : 2 * H].tolist()
    path = tmp_path / "gru.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(0).standard_normal((2, 3, D)).astype(np.float32)
    a = _session(model).run(None, {"x": x})
    b = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert [o.version for o in onnx.load(path).opset_import] == [22]
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


def test_lengths_clipped_to_0_T():
    """Out-of-range lengths act as gru_jax's traced ones: clipped to [0, T]."""
    sess = _session(to_onnx(_params(1, True), with_h0=True))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, D)).astype(np.float32)
    h0 = rng.standard_normal((2, 3, H)).astype(np.float32)
    clipped = sess.run(None, {"x": x, "lengths": np.array([4, 0, 2], np.int32), "h0": h0})
    raw = sess.run(None, {"x": x, "lengths": np.array([9, -3, 2], np.int32), "h0": h0})
    for u, v in zip(clipped, raw, strict=True):
        np.testing.assert_array_equal(u, v)
    assert np.all(raw[0][1] == 0.0)
    np.testing.assert_array_equal(raw[1][:, 1], h0[:, 1])


def test_bad_arguments():
    params = _params(1, False)
    bad = {"layer_0": dict(params["layer_0"], w_hh=np.zeros((1, H, 2 * H), np.float32))}
    with pytest.raises(ValueError, match=r"w_hh.*\(K, H, 3H\)"):
        to_onnx(bad)
    with pytest.raises(ValueError, match="layer_0"):
        to_onnx({"layer_1": params["layer_0"]})
    with pytest.raises(ValueError, match="opset must be in"):
        to_onnx(params, opset=13)
    assert to_onnx({"params": params}).graph.output[0].name == "output"  # linen variables


@pytest.mark.parametrize("with_lengths", [True, False])
@pytest.mark.parametrize("with_h0", [True, False])
def test_every_initializer_used(with_lengths, with_h0):
    """(onnxruntime warns about, and drops, initializers that no node reads.)"""
    for layers, bidir in [(1, False), (2, True)]:
        model = to_onnx(_params(layers, bidir), with_lengths=with_lengths, with_h0=with_h0)
        used = {name for n in model.graph.node for name in n.input}
        assert [i.name for i in model.graph.initializer if i.name not in used] == []


def test_import_is_light():
    code = "import sys, gru_jax.interop; print(sorted({'onnx', 'onnxruntime'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_missing_onnx_raises_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'gru-jax\[onnx\] @ git\+https://"):
        to_onnx(_params(1, False))


@pytest.mark.parametrize("opset", [14, 22])
def test_other_opsets_same_numbers(opset):
    params = _params(2, True)
    rng = np.random.default_rng(3)
    feeds = _inputs(rng, 3, 5, [5, 0, 2], 4, True, True)
    want = _session(to_onnx(params, with_h0=True)).run(None, feeds)
    model = to_onnx(params, with_h0=True, opset=opset)
    assert [o.version for o in model.opset_import] == [opset]
    for u, v in zip(_session(model).run(None, feeds), want, strict=True):
        np.testing.assert_array_equal(u, v)
