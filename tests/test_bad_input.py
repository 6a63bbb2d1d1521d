"""Bad input: every row of the table in README.md.

Each error test asserts the exception type and that the message names the argument, the
expected value and the actual one (``expect_error``). Behaviours that are not errors (NaN
propagation, clipping of traced lengths, empty batch, zero time steps) are asserted by value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import random_params
from jax.experimental import checkify

import gru_jax
from gru_jax.interop import from_torch

L, K, D, H, B, T = 2, 2, 3, 4, 2, 5
PARAMS = random_params(0, D, H, num_layers=L, bidirectional=True)
X = np.random.default_rng(1).standard_normal((B, T, D)).astype(np.float32)


def expect_error(exc_type, call, *fragments):
    """``call()`` raises ``exc_type`` whose message contains every fragment."""
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def gru(x=X, h0=None, **kwargs):
    return gru_jax.gru(PARAMS, x, h0, **kwargs)


# --------------------------------------------------------------------------------------------
# x
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(D,), (1, B, T, D)])
def test_x_wrong_rank(shape):
    expect_error(
        ValueError,
        lambda: gru(np.zeros(shape, np.float32)),
        "x must have shape (B, T, D)",
        "unbatched (T, D)",
        f"got rank {len(shape)}, shape {shape}",
    )


def test_x_wrong_rank_linen():
    x = np.zeros((1, B, T, D), np.float32)
    expect_error(
        ValueError,
        lambda: gru_jax.GRU(H).init(jax.random.key(0), x),
        "x must have shape (B, T, D)",
        f"shape {x.shape}",
    )


def test_linen_params_mismatch_says_which_value_is_the_params():
    one_direction = {"layer_0": {k: v[:1] for k, v in PARAMS["layer_0"].items()}}
    expect_error(
        ValueError,
        lambda: gru_jax.GRU(H, bidirectional=True).apply({"params": one_direction}, X),
        "params do not match the module's options",
        "bidirectional=False in the params, True in the module",
    )


def test_x_feature_size_mismatch():
    expect_error(
        ValueError,
        lambda: gru(np.zeros((B, T, D + 1), np.float32)),
        "x must have 3 features",
        f"got shape {(B, T, D + 1)}",
    )


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_x_not_floating(dtype):
    expect_error(
        TypeError,
        lambda: gru(X.astype(dtype)),
        "x must be a floating-point array",
        f"got dtype {np.dtype(dtype)}",
    )


def test_x_not_floating_linen():
    expect_error(
        TypeError,
        lambda: gru_jax.GRU(H).init(jax.random.key(0), X.astype(np.int32)),
        "x must be a floating-point array",
        "got dtype int32",
    )


# --------------------------------------------------------------------------------------------
# h0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(L * K, B + 1, H), (L * K, B, H + 1), (L, B, H), (L * K, H)],
    ids=["batch-mismatch", "hidden", "layers*dirs", "rank"],
)
def test_h0_wrong_shape(shape):
    expect_error(
        ValueError,
        lambda: gru(h0=np.zeros(shape, np.float32)),
        "h0 must have shape (L*K, B, H) = (4, 2, 4)",
        f"got {shape}",
    )


def test_h0_wrong_shape_unbatched():
    expect_error(
        ValueError,
        lambda: gru(X[0], h0=np.zeros((L * K, B, H), np.float32)),
        "h0 must have shape (L*K, H) = (4, 4)",
        f"got {(L * K, B, H)}",
    )


def test_h0_not_floating():
    expect_error(
        TypeError,
        lambda: gru(h0=np.zeros((L * K, B, H), np.int32)),
        "h0 must be a floating-point array",
        "got dtype int32",
    )


# --------------------------------------------------------------------------------------------
# lengths
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [np.array([5, 5, 5]), np.array([[5, 5]]), np.array(5)])
def test_lengths_wrong_shape(lengths):
    expect_error(
        ValueError,
        lambda: gru(lengths=lengths),
        "lengths must have shape (B,) = (2,)",
        f"got shape {lengths.shape}",
    )


@pytest.mark.parametrize("lengths", [np.array([5.0, 2.0], np.float32), np.array([True, False])])
def test_lengths_not_integer(lengths):
    expect_error(
        TypeError,
        lambda: gru(lengths=lengths),
        "lengths must be an integer array",
        f"got dtype {lengths.dtype}",
    )


@pytest.mark.parametrize("lengths, bad", [([-1, 5], -1), ([2, 6], 6), ([7, -2], 7)])
def test_concrete_lengths_out_of_range(lengths, bad):
    expect_error(
        ValueError,
        lambda: gru(lengths=np.array(lengths, np.int32)),
        "lengths must lie in [0, T] = [0, 5]",
        "out-of-range values [",
        str(bad),
    )


def test_concrete_lengths_out_of_range_unbatched():
    expect_error(
        ValueError,
        lambda: gru(X[0], lengths=7),
        "lengths must lie in [0, T] = [0, 5]",
        "[7]",
    )


def test_traced_lengths_out_of_range_are_clipped():
    """Under jit the values are unknown at trace time: clipped to [0, T], as documented."""
    jitted = jax.jit(lambda n: gru(lengths=n))
    out, h_n = jitted(np.array([-3, 9], np.int32))
    want_out, want_h = jitted(np.array([0, T], np.int32))
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(h_n, want_h)
    # -3 -> 0: nothing runs, the output is all zeros and h_n is h0 (zeros)
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(h_n[:, 0], 0.0)
    # 9 -> T: the full sequence, equal to running it without lengths
    full_out, full_h = gru(X[1:])
    np.testing.assert_allclose(out[1], full_out[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h_n[:, 1], full_h[:, 0], rtol=1e-6, atol=1e-6)


def test_checkify_opt_in_raises_on_traced_out_of_range():
    def f(n):
        return gru(lengths=n, checkify_lengths=True)

    checked = checkify.checkify(jax.jit(f))
    err, _ = checked(np.array([-3, 9], np.int32))
    with pytest.raises(checkify.JaxRuntimeError) as info:
        err.throw()
    for fragment in ("lengths must lie in [0, T] = [0, 5]", "-3", "9"):
        assert fragment in str(info.value)
    err, (out, _) = checked(np.array([5, 2], np.int32))
    err.throw()  # in range: no error
    want, _ = gru(lengths=np.array([5, 2], np.int32))
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# dropout, sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan")])
def test_dropout_out_of_range(p):
    expect_error(ValueError, lambda: gru(dropout=p), "dropout must be in [0, 1)", f"got {p}")
    expect_error(
        ValueError,
        lambda: gru_jax.GRU(H, num_layers=2, dropout=p).init(jax.random.key(0), X),
        "dropout must be in [0, 1)",
        f"got {p}",
    )


@pytest.mark.parametrize("value", [0, -2, 2.0, True])
def test_unroll_not_a_positive_integer(value):
    expect_error(
        ValueError, lambda: gru(unroll=value), "unroll must be an integer >= 1 or None", repr(value)
    )
    expect_error(
        ValueError,
        lambda: gru_jax.GRU(H, unroll=value).init(jax.random.key(0), X),
        "unroll must be an integer >= 1 or None",
        f"got {value!r}",
    )


@pytest.mark.parametrize("name", ["hidden_size", "num_layers"])
@pytest.mark.parametrize("value", [0, -1, 2.0])
def test_sizes_below_one(name, value):
    kwargs = {"hidden_size": H, "num_layers": 1} | {name: value}
    expect_error(
        ValueError,
        lambda: gru_jax.GRU(**kwargs).init(jax.random.key(0), X),
        f"{name} must be an integer >= 1",
        f"got {value!r}",
    )
    expect_error(
        ValueError,
        lambda: gru_jax.init_gru(jax.random.key(0), D, **kwargs),
        f"{name} must be an integer >= 1",
        f"got {value!r}",
    )


def test_cell_hidden_size_below_one():
    expect_error(
        ValueError,
        lambda: gru_jax.GRUCell(0).init(jax.random.key(0), np.zeros((B, 0)), X[:, 0]),
        "hidden_size must be an integer >= 1",
        "got 0",
    )


# --------------------------------------------------------------------------------------------
# params trees and torch state dicts
# --------------------------------------------------------------------------------------------


def test_params_tree_malformed():
    expect_error(
        ValueError,
        lambda: gru_jax.gru({"layer_1": PARAMS["layer_0"]}, X),
        "params must have keys layer_0",
        "got ['layer_1']",
    )
    expect_error(
        ValueError,
        lambda: gru_jax.gru({"layer_0": {"w_ih": PARAMS["layer_0"]["w_ih"]}}, X),
        "params['layer_0'] must have keys w_ih, w_hh",
        "missing ['w_hh']",
    )


@pytest.fixture(scope="module")
def torch_state_dict():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return dict(torch.nn.GRU(D, H, num_layers=2, bidirectional=True).state_dict())


@pytest.mark.parametrize("key", ["weight_hh_l1_reverse", "bias_ih_l0"])
def test_torch_state_dict_missing_key(torch_state_dict, key):
    sd = {k: v for k, v in torch_state_dict.items() if k != key}
    expect_error(ValueError, lambda: from_torch(sd), "state_dict is missing", f"'{key}'")


def test_torch_state_dict_extra_key(torch_state_dict):
    sd = dict(torch_state_dict, foo=np.zeros(1, np.float32))
    expect_error(ValueError, lambda: from_torch(sd), "unexpected keys", "'foo'")


def test_torch_state_dict_wrong_shape_both_directions(torch_state_dict):
    sd = dict(torch_state_dict)
    sd["weight_hh_l0"] = sd["weight_hh_l0_reverse"] = np.zeros((3 * H, H + 1), np.float32)
    expect_error(
        ValueError, lambda: from_torch(sd), "inconsistent shapes", "w_hh", f"{(2, H + 1, 3 * H)}"
    )


def test_torch_state_dict_wrong_shape_one_direction(torch_state_dict):
    sd = dict(torch_state_dict, weight_hh_l0=np.zeros((3 * H, H + 1), np.float32))
    expect_error(ValueError, lambda: from_torch(sd), "weight_hh_l0", f"{(3 * H, H + 1)}")


def test_torch_state_dict_of_a_bigger_model_names_the_prefix():
    """A model that holds a GRU: its state dict is refused with the prefix to pass, which
    then reads the GRU's entries."""
    torch = pytest.importorskip("torch")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(D, H, batch_first=True)
            self.fc = torch.nn.Linear(H, 2)

    state_dict = Model().state_dict()
    hint = "GRU entries start with 'gru.'", "from_torch(state_dict, prefix='gru.')"
    expect_error(ValueError, lambda: from_torch(state_dict), "unexpected keys", "'fc.bias'", *hint)
    expect_error(
        ValueError, lambda: from_torch(state_dict, prefix="encoder."), "prefix 'encoder.'", *hint
    )
    tree = from_torch(state_dict, prefix="gru.")
    np.testing.assert_array_equal(tree["layer_0"]["w_hh"][0], state_dict["gru.weight_hh_l0"].T)
    expect_error(
        ValueError,
        lambda: from_torch({"enc.gru.weight_ih_l0": 0, "dec.cell.bias_hh": 0}),
        "start with 'dec.cell.', 'enc.gru.'",
    )


def test_torch_state_dict_not_a_mapping():
    expect_error(TypeError, lambda: from_torch([1, 2]), "state_dict must be a mapping", "got list")


# --------------------------------------------------------------------------------------------
# gru_step
# --------------------------------------------------------------------------------------------

CELL = {k: v[0] for k, v in PARAMS["layer_0"].items()}


def test_gru_step_wrong_sizes():
    h, x = np.zeros((B, H), np.float32), X[:, 0]
    expect_error(
        ValueError,
        lambda: gru_jax.gru_step(CELL, np.zeros((B, H + 1), np.float32), x),
        "h must have shape (..., H) = (..., 4)",
        f"got {(B, H + 1)}",
    )
    expect_error(
        ValueError,
        lambda: gru_jax.gru_step(CELL, h, np.zeros((B, D + 1), np.float32)),
        "x must have shape (..., D) = (..., 3)",
        f"got {(B, D + 1)}",
    )
    expect_error(
        TypeError,
        lambda: gru_jax.gru_step(CELL, h, x.astype(np.int32)),
        "x must be a floating-point array",
        "got dtype int32",
    )


def test_gru_step_batch_mismatch():
    expect_error(
        ValueError,
        lambda: gru_jax.gru_step(CELL, np.zeros((B + 1, H), np.float32), X[:, 0]),
        "h",
        "x",
        f"{(B + 1, H)}",
    )


# --------------------------------------------------------------------------------------------
# dtype
# --------------------------------------------------------------------------------------------


def test_dtype_not_floating():
    expect_error(TypeError, lambda: gru(dtype=jnp.int32), "dtype", "int32")


# --------------------------------------------------------------------------------------------
# Not errors: NaN propagation, empty batch, zero steps
# --------------------------------------------------------------------------------------------


def test_nan_input_propagates_within_its_sequence_only():
    """NaN at a valid step of one sequence: NaN in that sequence (forward direction from that
    step on, reverse direction up to it, h_n), never in the other sequences. No error: inputs
    are not scanned for NaN (use ``jax_debug_nans`` or ``checkify`` float checks for that).
    """
    x = X.copy()
    x[0, 2, 1] = np.nan
    lengths = np.array([4, 5], np.int32)
    one_layer = {"layer_0": PARAMS["layer_0"]}
    out, h_n = (np.asarray(a) for a in gru_jax.gru(one_layer, x, lengths=lengths))
    fwd, rev = out[0, :, :H], out[0, :, H:]
    assert np.all(np.isnan(fwd[2:4])) and not np.any(np.isnan(fwd[:2]))
    assert np.all(np.isnan(rev[:3])) and not np.any(np.isnan(rev[3]))
    assert np.all(np.isnan(h_n[:, 0]))
    # Two layers: layer 1 sees NaN at every valid step of sequence 0.
    out, h_n = (np.asarray(a) for a in gru(x, lengths=lengths))
    clean_out, clean_h = gru(X, lengths=lengths)
    assert np.all(np.isnan(out[0, :4])) and np.all(np.isnan(h_n[:, 0]))
    np.testing.assert_array_equal(out[0, 4:], 0.0)  # padding stays exactly zero
    np.testing.assert_allclose(out[1], clean_out[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h_n[:, 1], clean_h[:, 1], rtol=1e-6, atol=1e-6)


def test_empty_batch():
    """B = 0 (as torch): empty output ``(0, T, K*H)`` and h_n ``(L*K, 0, H)``."""
    out, h_n = gru(np.zeros((0, T, D), np.float32), lengths=np.zeros((0,), np.int32))
    assert out.shape == (0, T, K * H) and h_n.shape == (L * K, 0, H)
    assert out.dtype == jnp.float32 and h_n.dtype == jnp.float32
    (out, h_n), _ = gru_jax.GRU(H).init_with_output(
        jax.random.key(0), np.zeros((0, T, D), np.float32)
    )
    assert out.shape == (0, T, H) and h_n.shape == (1, 0, H)


@pytest.mark.parametrize("remat", [False, True])
def test_empty_batch_gradient(remat):
    """B = 0 trains too: every chunking (forward, remat backward) copes with no rows, and the
    weight gradients are exactly zero (a sum over no rows), long T included."""
    x = np.zeros((0, 300, D), np.float32)

    def loss(params):
        out, h_n = gru_jax.gru(params, x, lengths=np.zeros((0,), np.int32), remat=remat)
        return jnp.sum(out) + jnp.sum(h_n)

    grads = jax.jit(jax.grad(loss))(PARAMS)
    for g in jax.tree.leaves(grads):
        np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_zero_time_steps(batch_first):
    """T = 0 (torch raises): empty output ``(B, 0, K*H)``, and h_n == h0 (zeros if None).

    The natural limit of the recurrence, consistent with a sequence of length 0.
    """
    x = np.zeros((B, 0, D) if batch_first else (0, B, D), np.float32)
    h0 = np.random.default_rng(2).standard_normal((L * K, B, H)).astype(np.float32)
    out, h_n = gru(x, h0, batch_first=batch_first)
    assert out.shape == ((B, 0, K * H) if batch_first else (0, B, K * H))
    np.testing.assert_array_equal(h_n, h0)
    out, h_n = gru(x, batch_first=batch_first, lengths=np.zeros(B, np.int32))
    np.testing.assert_array_equal(h_n, np.zeros((L * K, B, H)))
    out, h_n = gru(np.zeros((0, D), np.float32), h0[:, 0])  # unbatched
    assert out.shape == (0, K * H)
    np.testing.assert_array_equal(h_n, h0[:, 0])


@pytest.mark.parametrize("remat", [False, True])
def test_zero_time_steps_gradient(remat):
    """T = 0 trains too (no chunk to rerun with remat): the only path from the parameters to
    the loss is h_n = h0, so the weight gradients are exactly zero and h0's is the loss's."""
    x = np.zeros((B, 0, D), np.float32)
    h0 = np.random.default_rng(3).standard_normal((L * K, B, H)).astype(np.float32)

    def loss(params, h0):
        out, h_n = gru_jax.gru(params, x, h0, lengths=np.zeros(B, np.int32), remat=remat)
        return jnp.sum(out) + jnp.sum(h_n * h_n)

    g_params, g_h0 = jax.jit(jax.grad(loss, argnums=(0, 1)))(PARAMS, h0)
    for g in jax.tree.leaves(g_params):
        np.testing.assert_array_equal(g, 0.0)
    np.testing.assert_allclose(g_h0, 2 * h0, rtol=1e-6)
