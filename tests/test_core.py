"""The pure core: the cell's equations, scan == step loop, jit, dropout, lengths edge cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import random_params, reference_gru
from test_long_sequences import temp_bytes

import gru_jax


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _numpy_cell(cell, h, x, reset_after):
    """float64 NumPy, written from the equations with per-gate weight blocks."""
    w_ih, w_hh = (np.asarray(cell[k], np.float64) for k in ("w_ih", "w_hh"))
    hid = w_hh.shape[0]
    b_ih = np.asarray(cell.get("b_ih", np.zeros(3 * hid)), np.float64)
    b_hh = np.asarray(cell.get("b_hh", np.zeros(3 * hid)), np.float64)
    blk = [slice(i * hid, (i + 1) * hid) for i in range(3)]
    r = _sigmoid(x @ w_ih[:, blk[0]] + b_ih[blk[0]] + h @ w_hh[:, blk[0]] + b_hh[blk[0]])
    z = _sigmoid(x @ w_ih[:, blk[1]] + b_ih[blk[1]] + h @ w_hh[:, blk[1]] + b_hh[blk[1]])
    if reset_after:
        n = np.tanh(x @ w_ih[:, blk[2]] + b_ih[blk[2]] + r * (h @ w_hh[:, blk[2]] + b_hh[blk[2]]))
    else:
        n = np.tanh(x @ w_ih[:, blk[2]] + b_ih[blk[2]] + (r * h) @ w_hh[:, blk[2]] + b_hh[blk[2]])
    return (1 - z) * n + z * h


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_gru_step_matches_float64_equations(reset_after, bias):
    cell = gru_jax.init_cell(jax.random.key(0), 5, 4, bias=bias)
    rng = np.random.default_rng(1)
    h, x = rng.standard_normal((3, 4)), rng.standard_normal((3, 5))
    got = gru_jax.gru_step(
        cell, h.astype(np.float32), x.astype(np.float32), reset_after=reset_after
    )
    want = _numpy_cell(cell, h, x, reset_after)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_tanh_form_sigmoid_is_within_float_rounding_of_the_logistic():
    """The gates' sigmoid, computed as (1 + tanh(x/2)) / 2, against float64 1 / (1 + e^-x)
    of the same inputs: absolute error about an ulp of 1 (float32: 1.44e-7 measured, vs
    8.9e-8 for jax.nn.sigmoid), exact 0 and 1 at -inf and +inf, and float64 exact to 1e-15."""
    from gru_jax._cell import sigmoid as tanh_form

    x32 = np.concatenate([np.linspace(-40, 40, 200001), [-1e4, 1e4, -np.inf, np.inf]])
    x32 = x32.astype(np.float32)
    x = x32.astype(np.float64)
    with np.errstate(over="ignore"):
        want = _sigmoid(x)
    got = np.asarray(tanh_form(jnp.asarray(x32)), np.float64)
    assert np.max(np.abs(got - want)) < 2e-7
    assert got[-2] == 0.0 and got[-1] == 1.0
    with jax.enable_x64(True):
        got64 = np.asarray(tanh_form(jnp.asarray(x)))
    np.testing.assert_allclose(got64, want, rtol=0, atol=1e-15)


def test_reset_before_and_after_differ():
    """The two variants are different functions (guards against an ignored flag)."""
    cell = gru_jax.init_cell(jax.random.key(0), 5, 4)
    h, x = jnp.ones((2, 4)), jnp.ones((2, 5))
    after = gru_jax.gru_step(cell, h, x, reset_after=True)
    before = gru_jax.gru_step(cell, h, x, reset_after=False)
    assert float(jnp.max(jnp.abs(after - before))) > 1e-4


@pytest.mark.parametrize("reset_after", [True, False])
def test_reset_before_sequence_matches_float64_loop(reset_after):
    """reset_after=False over a bidirectional 2-layer stack vs a float64 NumPy loop."""
    params = gru_jax.init_gru(jax.random.key(2), 3, 5, num_layers=2, bidirectional=True)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 3))
    out, h_n = gru_jax.gru(params, x.astype(np.float32), reset_after=reset_after)

    layer_in, finals = x, []
    for layer in range(2):
        outs = []
        for d in range(2):
            cell = gru_jax.cell_of(params, layer, d)
            h, ys = np.zeros((2, 5)), np.zeros((2, 6, 5))
            steps = range(6) if d == 0 else reversed(range(6))
            for t in steps:
                h = _numpy_cell(cell, h, layer_in[:, t], reset_after)
                ys[:, t] = h
            outs.append(ys)
            finals.append(h)
        layer_in = np.concatenate(outs, axis=-1)
    np.testing.assert_allclose(out, layer_in, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_n, np.stack(finals), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reset_after", [True, False])
def test_scan_equals_step_loop(reset_after):
    params = gru_jax.init_gru(jax.random.key(4), 4, 3, num_layers=1)
    cell = gru_jax.cell_of(params)
    x = jax.random.normal(jax.random.key(5), (2, 9, 4))
    h0 = jax.random.normal(jax.random.key(6), (1, 2, 3))
    out, h_n = gru_jax.gru(params, x, h0, reset_after=reset_after)
    h = h0[0]
    for t in range(9):
        h = gru_jax.gru_step(cell, h, x[:, t], reset_after=reset_after)
        np.testing.assert_allclose(out[:, t], h, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h_n[0], h, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("steps", [1, 20, 97])
def test_inference_loop_matches_reference_and_derivative_forward(steps, batch_first):
    """Inference runs its own loop (in place, in the caller's layout); the derivative runs a
    time-major scan that keeps the gates, or with ``remat`` a loop over chunks (for B = 64:
    three of 32 steps and a 1-step tail at T = 97). All give the float64 reference, in
    either layout, with lengths 0, 1 and T among the rows."""
    batch = 64
    params = random_params(3, 4, 5, num_layers=2, bidirectional=True)
    rng = np.random.default_rng(steps)
    x = rng.standard_normal((batch, steps, 4)).astype(np.float32)
    lengths = rng.integers(0, steps + 1, batch).astype(np.int32)
    lengths[:3] = [0, steps, 1]
    x_in = x if batch_first else np.swapaxes(x, 0, 1)

    def run(params, x, remat=False):
        return gru_jax.gru(params, x, lengths=lengths, batch_first=batch_first, remat=remat)

    out, h_n = jax.jit(run)(params, x_in)
    ref_out, ref_h = reference_gru(params, x, lengths=lengths)
    out_bf = np.asarray(out) if batch_first else np.swapaxes(np.asarray(out), 0, 1)
    np.testing.assert_allclose(out_bf, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h_n), ref_h, rtol=1e-5, atol=1e-5)
    for remat in (False, True):
        (vjp_out, vjp_h), _ = jax.vjp(functools.partial(run, remat=remat), params, x_in)
        np.testing.assert_allclose(np.asarray(out), np.asarray(vjp_out), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(h_n), np.asarray(vjp_h), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "lengths",
    [[3, 9, 0, 9, 1, 5, 5], [0] * 7, [9] * 7, [2, 2, 2, 2, 2, 2, 8]],
    ids=["mixed", "all-0", "all-T", "one-long"],
)
def test_phased_inference_with_h0_and_uneven_phases(lengths):
    """With lengths, inference sorts the rows and runs them in phases over shrinking row
    prefixes (B = 7: prefixes of 7, 5, 4, 2 rows); ties, empty phases, all-zero lengths and
    an h0 must give the float64 reference, also under vmap (per-example loop bounds)."""
    params = random_params(4, 3, 5, num_layers=2, bidirectional=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 9, 3)).astype(np.float32)
    h0 = rng.standard_normal((2, 4, 7, 5)).astype(np.float32)
    lens = np.stack([np.asarray(lengths, np.int32), rng.integers(0, 10, 7).astype(np.int32)])

    def run(x, h0, n):
        return gru_jax.gru(params, x, h0, lengths=n)

    out, h_n = jax.jit(jax.vmap(run))(x, h0, lens)
    for i in range(2):
        ref_out, ref_h = reference_gru(params, x[i], h0[i], lengths=lens[i])
        np.testing.assert_allclose(out[i], ref_out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(h_n[i], ref_h, rtol=1e-5, atol=1e-5)
    # The derivative's forward (an unsorted scan over every step) agrees.
    (vjp_out, vjp_h), _ = jax.vjp(run, x[0], h0[0], lens[0])
    np.testing.assert_allclose(out[0], vjp_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h_n[0], vjp_h, rtol=1e-6, atol=1e-6)


def test_default_unroll_is_one_on_cpu_and_eight_on_accelerators():
    """``unroll=None`` resolves per backend; on this (CPU) backend it is the unroll-1 loop."""
    assert gru_jax.default_unroll("cpu") == 1
    assert gru_jax.default_unroll("gpu") == gru_jax.default_unroll("tpu") == 8
    assert gru_jax.default_unroll() == gru_jax.default_unroll(jax.default_backend())
    # jax.default_device names the platform that computations go to (the CPU of a GPU
    # machine, say): a device or a platform name, which is all this needs to resolve.
    with jax.default_device("tpu"):
        assert gru_jax.default_unroll() == 8
        with jax.default_device(jax.devices("cpu")[0]):
            assert gru_jax.default_unroll() == 1
    params = random_params(3, 3, 4, num_layers=2, bidirectional=True)
    x = np.random.default_rng(4).standard_normal((2, 7, 3)).astype(np.float32)
    lengths = np.array([7, 4], np.int32)
    f = jax.jit(gru_jax.gru, static_argnames="unroll")
    default = f(params, x, lengths=lengths)
    for unroll in (1, 8, np.int64(8)):  # any integer type
        got = f(params, x, lengths=lengths, unroll=unroll)
        same = unroll == gru_jax.default_unroll()
        for a, b in zip(default, got, strict=True):
            if same:  # the same program
                np.testing.assert_array_equal(a, b)
            else:  # another loop over the same math
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_jit_equals_no_jit_with_traced_lengths():
    params = gru_jax.init_gru(jax.random.key(7), 4, 3, num_layers=2, bidirectional=True)
    x = jax.random.normal(jax.random.key(8), (3, 5, 4))
    lengths = jnp.array([5, 0, 2])
    eager = gru_jax.gru(params, x, lengths=lengths)
    jitted = jax.jit(lambda p, x, n: gru_jax.gru(p, x, lengths=n))(params, x, lengths)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("with_lengths", [False, True])
def test_h_n_keeps_no_layer_states_alive(with_lengths):
    """h_n comes from each loop's final carry, not from reading the states afterwards.

    A read of the states (at lengths - 1) fused into the stack's final concatenation and
    kept every layer's (B, T, H) states alive to the end: asking for h_n cost 1.75 states
    of XLA scratch on this problem. Now it costs no more than h_n itself.
    """
    b, t, d, h = 8, 64, 16, 64
    params = gru_jax.init_gru(jax.random.key(0), d, h, num_layers=2, bidirectional=True)
    x = jnp.ones((b, t, d))
    lengths = jnp.array([64, 60, 50, 40, 30, 20, 10, 5]) if with_lengths else None

    def temp(fn):
        return temp_bytes(jax.jit(fn).lower(params, x).compile())

    def run(p, x):
        return gru_jax.gru(p, x, lengths=lengths, batch_first=True)

    both = temp(run)
    out_only = temp(lambda p, x: run(p, x)[0])
    states = b * t * h * 4  # one direction of one layer
    assert both - out_only <= states // 4, ((both - out_only) / states, "states")


def test_length_zero_gives_h0_and_zero_outputs_everywhere():
    params = gru_jax.init_gru(jax.random.key(9), 4, 3, num_layers=2, bidirectional=True)
    x = jax.random.normal(jax.random.key(10), (2, 5, 4))
    h0 = jax.random.normal(jax.random.key(11), (4, 2, 3))
    out, h_n = gru_jax.gru(params, x, h0, lengths=jnp.array([0, 3]))
    np.testing.assert_array_equal(out[0], np.zeros((5, 6), np.float32))
    np.testing.assert_array_equal(out[1, 3:], np.zeros((2, 6), np.float32))
    np.testing.assert_array_equal(h_n[:, 0], h0[:, 0])
    # A sequence cut to its length gives the same result as the padded batch.
    alone, h_alone = gru_jax.gru(params, x[1:, :3], h0[:, 1:])
    np.testing.assert_allclose(out[1:, :3], alone, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h_n[:, 1:], h_alone, rtol=1e-6, atol=1e-6)


def _dropout_setup():
    params = gru_jax.init_gru(jax.random.key(12), 4, 8, num_layers=3)
    x = jax.random.normal(jax.random.key(13), (4, 6, 4))
    return params, x


def test_dropout_is_identity_without_key():
    params, x = _dropout_setup()
    plain = gru_jax.gru(params, x)
    no_key = gru_jax.gru(params, x, dropout=0.5)
    for a, b in zip(plain, no_key, strict=True):
        np.testing.assert_array_equal(a, b)


def test_dropout_masks_depend_on_key_and_never_hit_last_layer():
    params, x = _dropout_setup()
    plain, _ = gru_jax.gru(params, x)
    a, h_a = gru_jax.gru(params, x, dropout=0.5, key=jax.random.key(0))
    a2, _ = gru_jax.gru(params, x, dropout=0.5, key=jax.random.key(0))
    b, _ = gru_jax.gru(params, x, dropout=0.5, key=jax.random.key(1))
    np.testing.assert_array_equal(a, a2)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    assert float(jnp.max(jnp.abs(a - plain))) > 1e-3
    # Dropout on the last layer's output would zero about half of it; tanh never gives 0.
    assert int(jnp.sum(a == 0.0)) == 0
    np.testing.assert_array_equal(h_a[-1], a[:, -1])


def test_dropout_scales_kept_units_by_inverse_keep_probability():
    """Layer 2 sees layer 1's output with units zeroed or scaled by 1 / (1 - p)."""
    params = gru_jax.init_gru(jax.random.key(14), 4, 8, num_layers=2)
    x = jax.random.normal(jax.random.key(15), (4, 6, 4))
    key, p = jax.random.key(3), 0.25
    out, _ = gru_jax.gru(params, x, dropout=p, key=key)
    y1, _ = gru_jax.gru({"layer_0": params["layer_0"]}, x)
    # Rebuild the dropped input from the same key schedule the core documents (split per layer).
    keep = jax.random.bernoulli(jax.random.split(key, 1)[0], 1 - p, (6, 4, 8))
    dropped = jnp.where(jnp.swapaxes(keep, 0, 1), y1 / (1 - p), 0.0)
    want, _ = gru_jax.gru({"layer_0": params["layer_1"]}, dropped)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_linen_dropout_uses_dropout_stream_only_when_not_deterministic():
    model = gru_jax.GRU(8, num_layers=2, dropout=0.5)
    x = jax.random.normal(jax.random.key(16), (2, 5, 3))
    variables = model.init(jax.random.key(0), x)
    det, _ = model.apply(variables, x, deterministic=True)
    no_drop, _ = gru_jax.GRU(8, num_layers=2).apply(variables, x)
    np.testing.assert_array_equal(det, no_drop)
    t1, _ = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    t2, _ = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.max(jnp.abs(t1 - t2))) > 1e-3
    assert float(jnp.max(jnp.abs(t1 - det))) > 1e-3


def test_linen_params_tree_layout_and_torch_init_bounds():
    model = gru_jax.GRU(6, num_layers=2, bidirectional=True)
    params = model.init(jax.random.key(0), jnp.zeros((1, 3, 5)))["params"]
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {
        "layer_0": {"w_ih": (2, 5, 18), "w_hh": (2, 6, 18), "b_ih": (2, 18), "b_hh": (2, 18)},
        "layer_1": {"w_ih": (2, 12, 18), "w_hh": (2, 6, 18), "b_ih": (2, 18), "b_hh": (2, 18)},
    }
    bound = 1 / np.sqrt(6)
    for leaf in jax.tree.leaves(params):
        assert float(jnp.max(jnp.abs(leaf))) <= bound
        assert float(jnp.std(leaf)) > 0.5 * bound / np.sqrt(3)  # not a constant fill
