"""from_keras: Keras 3 GRU / Bidirectional(GRU) weights reproduce Keras's outputs (JAX backend)."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

keras = pytest.importorskip("keras")
layers = keras.layers

import gru_jax  # noqa: E402
from gru_jax.interop import _keras_weights, from_keras, stack_cells  # noqa: E402

D, H, T, B = 3, 4, 5, 2
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _lenient():
    """Keras's own JAX code relies on NumPy-style promotion, which conftest makes strict;
    relax it around Keras calls only, so gru_jax still runs strict."""
    return jax.numpy_rank_promotion("allow")


def _build(layer, shape, rng):
    """Builds ``layer`` for inputs ``shape`` and gives every weight random non-zero values."""
    with _lenient():
        layer.build(shape)
    layer.set_weights([rng.normal(0.0, 0.5, w.shape).astype(np.float32) for w in layer.weights])
    return layer


def _run(tree, x, reset_after, **kwargs):
    return jax.jit(lambda t, x: gru_jax.gru(t, x, reset_after=reset_after, **kwargs))(tree, x)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
def test_gru_matches_keras(reset_after, use_bias):
    rng = np.random.default_rng(int(reset_after) * 2 + int(use_bias))
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    h = rng.normal(size=(B, H)).astype(np.float32)
    layer = layers.GRU(
        H, reset_after=reset_after, use_bias=use_bias, return_sequences=True, return_state=True
    )
    _build(layer, x.shape, rng)
    with _lenient():
        seq, state = layer(x, initial_state=[h])

    tree = from_keras(layer)
    assert set(tree["layer_0"]) == (
        {"w_ih", "w_hh", "b_ih", "b_hh"} if use_bias else {"w_ih", "w_hh"}
    )
    out, h_n = _run(tree, jnp.asarray(x), reset_after, h0=jnp.asarray(h)[None])
    np.testing.assert_allclose(out, np.asarray(seq), **TOL)
    np.testing.assert_allclose(h_n[0], np.asarray(state), **TOL)
    # The get_weights() list converts to the same tree.
    same = from_keras(layer.get_weights())
    jax.tree.map(np.testing.assert_array_equal, same, tree)
    if use_bias and not reset_after:  # Keras v1 cell: a single, input-side bias
        np.testing.assert_array_equal(tree["layer_0"]["b_hh"], 0.0)


def test_bidirectional_with_mask_matches_keras_lengths():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    lengths = np.array([T, 3])
    mask = np.arange(T)[None, :] < lengths[:, None]
    layer = layers.Bidirectional(layers.GRU(H, return_sequences=True, return_state=True))
    _build(layer, x.shape, rng)
    with _lenient():
        seq, h_fwd, h_bwd = layer(x, mask=mask)

    tree = from_keras(layer)
    assert tree["layer_0"]["w_ih"].shape == (2, D, 3 * H)
    out, h_n = _run(tree, jnp.asarray(x), True, lengths=jnp.asarray(lengths))
    seq = np.asarray(seq)
    np.testing.assert_allclose(np.asarray(out)[mask], seq[mask], **TOL)
    np.testing.assert_array_equal(np.asarray(out)[~mask], 0.0)
    np.testing.assert_allclose(h_n[0], np.asarray(h_fwd), **TOL)
    np.testing.assert_allclose(h_n[1], np.asarray(h_bwd), **TOL)


def test_stacked_keras_layers_match_keras_last_output():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    first = _build(layers.GRU(H, return_sequences=True), x.shape, rng)
    second = _build(layers.GRU(H, reset_after=True), (B, T, H), rng)
    with _lenient():
        y = np.asarray(second(first(x)))  # return_sequences=False: the last step's output

    tree = from_keras([first, second])
    assert tree["layer_1"]["w_ih"].shape == (1, H, 3 * H)
    out, h_n = _run(tree, jnp.asarray(x), True)
    np.testing.assert_allclose(h_n[-1], y, **TOL)
    np.testing.assert_allclose(out[:, -1], y, **TOL)


def _built(layer, shape=(1, T, D)):
    with _lenient():
        layer.build(shape)
    return layer


@pytest.mark.parametrize(
    "make,msg",
    [
        # The type and merge mode are checked before anything is read: no need to build.
        (lambda: layers.LSTM(H), "expected a keras.layers.GRU"),
        (lambda: layers.Dense(H), "expected a keras.layers.GRU"),
        (lambda: [layers.LSTM(H)], r"layers\[0\]: expected a keras.layers.GRU"),
        (
            lambda: layers.Bidirectional(layers.GRU(H), merge_mode="sum"),
            "merge_mode='sum' cannot be expressed",
        ),
        (lambda: layers.GRU(H), "not built"),
        (lambda: _built(layers.GRU(H, activation="relu")), "activation must be tanh"),
        (lambda: _built(layers.GRU(H, go_backwards=True)), "go_backwards=True"),
        (lambda: [np.zeros((D, 3 * H))] * 5, "2 or 3 arrays"),
        (lambda: [np.zeros((D, 3 * H)), np.zeros((H, 3 * H)), np.zeros((3, 3 * H))], "bias"),
        # Not a multiple of three: refused by its shape, not cut to fit the gate blocks.
        (lambda: [np.zeros((D, 3 * H)), np.zeros((H, 3 * H)), np.zeros(3 * H + 1)], "bias"),
        (lambda: [np.zeros((D, 3 * H)), np.zeros((H + 1, 3 * H))], "recurrent_kernel"),
        (
            lambda: [_built(layers.GRU(H)), _built(layers.GRU(H, reset_after=False), (1, T, H))],
            "same reset_after",
        ),
        (lambda: [_built(layers.GRU(H)), _built(layers.GRU(H), (1, T, D))], "stack"),
        (lambda: {"kernel": np.zeros((D, 3 * H))}, "from_keras expects"),
    ],
)
def test_bad_keras_input_raises(make, msg):
    with pytest.raises(ValueError, match=msg):
        from_keras(make())


def test_merge_mode_none_converts_like_concat():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(1, T, D)).astype(np.float32)
    layer = _build(layers.Bidirectional(layers.GRU(H), merge_mode=None), x.shape, rng)
    tree = from_keras(layer)
    with _lenient():
        fwd, bwd = layer(x)
    _, h_n = _run(tree, jnp.asarray(x), True)
    np.testing.assert_allclose(h_n[0], np.asarray(fwd), **TOL)
    np.testing.assert_allclose(h_n[1], np.asarray(bwd), **TOL)


@pytest.mark.parametrize("bias", [True, False])
def test_keras_weights_are_what_from_keras_reads(bias):
    """The benchmark's Keras peer gets its weights from ``_keras_weights``: the inverse of
    ``from_keras`` (gates back in Keras's order ``z, r, h``)."""
    cell = gru_jax.cell_of(gru_jax.init_gru(jax.random.key(3), D, H, bias=bias))
    weights = _keras_weights(cell)
    assert [w.shape for w in weights] == [(D, 3 * H), (H, 3 * H), (2, 3 * H)][: len(weights)]
    np.testing.assert_array_equal(weights[0][:, :H], cell["w_ih"][:, H : 2 * H])  # z first
    back = from_keras(weights)
    for name, value in stack_cells([cell]).items():
        jax.tree.map(np.testing.assert_array_equal, back[name], value)
