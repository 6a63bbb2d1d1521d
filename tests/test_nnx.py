"""gru_jax.nnx: same tree, outputs and gradients as linen; loading; dropout modes; nnx.RNN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import gru_jax
from gru_jax import nnx as gnnx
from gru_jax.interop import from_torch, stack_cells

D, H, T, B = 3, 5, 6, 2
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _x(seed, shape=(B, T, D)):
    # NumPy draws: jax.random would compile a kernel per shape, the bulk of a test's time here.
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _tree(seed, **options):
    """A stack tree with NumPy-drawn values (shapes from init_gru, nothing compiled)."""
    shapes = jax.eval_shape(lambda k: gru_jax.init_gru(k, D, H, **options), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(-0.5, 0.5, a.shape).astype(np.float32)), shapes
    )


def _cell(seed, **options):
    return gru_jax.cell_of(_tree(seed, **options))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# (options, call kwargs, check gradients): layers, directions, bias, reset_after, layout, h0,
# lengths. Gradients once (each costs seconds of compilation): both modules call the same
# core, so what can differ is the wiring.
_CASES = [
    ({"bidirectional": True}, {"lengths": True, "h0": True}, True),
    ({"bias": False, "reset_after": False}, {}, False),
    (
        {"num_layers": 2, "bidirectional": True, "batch_first": False},
        {"h0": True, "lengths": True},
        False,
    ),
]


@pytest.mark.parametrize("options,call,grads", _CASES)
def test_nnx_equals_linen_outputs_and_gradients_on_one_tree(options, call, grads):
    linen = gru_jax.GRU(H, **options)
    x = _x(0)
    if not options.get("batch_first", True):
        x = jnp.swapaxes(x, 0, 1)
    k = 2 if options.get("bidirectional") else 1
    kwargs = {}
    if call.get("h0"):
        kwargs["h0"] = _x(1, (options.get("num_layers", 1) * k, B, H))
    if call.get("lengths"):
        kwargs["lengths"] = jnp.array([T, 3])
    # The tree linen would create (its structure checked cheaply with eval_shape).
    params = _tree(
        2,
        num_layers=options.get("num_layers", 1),
        bidirectional=options.get("bidirectional", False),
        bias=options.get("bias", True),
    )
    linen_shapes = jax.eval_shape(linen.init, jax.random.key(2), x)["params"]
    assert jax.tree.map(jnp.shape, dict(linen_shapes)) == jax.tree.map(jnp.shape, params)
    model = gnnx.GRU.from_params(
        {"params": params},
        **{k_: v for k_, v in options.items() if k_ in ("reset_after", "batch_first")},
    )
    # The nnx module holds exactly that tree, readable the NNX way too.
    _assert_trees_equal(model.params_tree(), params)
    _assert_trees_equal(nnx.state(model, nnx.Param).to_pure_dict(), params)

    def loss(out, h):
        return jnp.sum(out**2) + jnp.sum(jnp.sin(h)), (out, h)

    # One jitted value_and_grad per module (compile time dominates at these sizes).
    @jax.jit
    def run_linen(p):
        if not grads:
            return (*linen.apply({"params": p}, x, **kwargs), None)
        f = lambda q: loss(*linen.apply({"params": q}, x, **kwargs))  # noqa: E731
        (_, (out, h)), g = jax.value_and_grad(f, has_aux=True)(p)
        return out, h, g

    @nnx.jit
    def run_nnx(m):
        if not grads:
            return (*m(x, **kwargs), None)
        (_, (out, h)), g = nnx.value_and_grad(lambda m: loss(*m(x, **kwargs)), has_aux=True)(m)
        return out, h, g

    out_l, h_l, g_l = run_linen(params)
    out_n, h_n, g_n = run_nnx(model)
    np.testing.assert_allclose(out_n, out_l, **TOL)
    np.testing.assert_allclose(h_n, h_l, **TOL)
    assert float(jnp.abs(out_n).max()) > 1e-2  # not a trivially zero output
    if not grads:
        return
    g_n = g_n.to_pure_dict()
    assert jax.tree.structure(g_n) == jax.tree.structure(dict(g_l))
    for a, b in zip(jax.tree.leaves(g_n), jax.tree.leaves(dict(g_l)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_n)) > 1e-2


def test_fresh_nnx_tree_has_linen_layout_and_torch_init():
    options = {"num_layers": 2, "bias": True}
    model = gnnx.GRU(D, H, **options, rngs=nnx.Rngs(0))
    ref = jax.eval_shape(gru_jax.GRU(H, **options).init, jax.random.key(0), _x(0))["params"]
    assert jax.tree.map(jnp.shape, model.params_tree()) == jax.tree.map(jnp.shape, dict(ref))
    leaves = jax.tree.leaves(model.params_tree())
    bound = 1 / np.sqrt(H)
    assert all(float(jnp.abs(a).max()) <= bound for a in leaves)
    assert float(jnp.abs(leaves[0]).max()) > 0.5 * bound  # drawn, not zeros
    cell = gnnx.GRUCell(D, H, bias=False, rngs=nnx.Rngs(0))
    assert jax.tree.map(jnp.shape, cell.params_tree()) == {"w_ih": (D, 3 * H), "w_hh": (H, 3 * H)}


def test_torch_weights_load_into_nnx_in_one_line():
    torch.manual_seed(0)
    ref = torch.nn.GRU(D, H, bidirectional=True, batch_first=True)
    model = gnnx.GRU.from_params(from_torch(ref.state_dict()))
    x = _x(3)
    out, h_n = model(x)
    t_out, t_h = ref(torch.tensor(np.asarray(x)))
    np.testing.assert_allclose(out, t_out.detach().numpy(), **TOL)
    np.testing.assert_allclose(h_n, t_h.detach().numpy(), **TOL)


def test_load_params_is_checked_and_all_or_nothing():
    model = gnnx.GRU.from_params(_tree(0, num_layers=2))
    before = model.params_tree()
    other = _tree(1, num_layers=2)

    wrong_shape = jax.tree.map(lambda a: a, other)
    wrong_shape["layer_1"]["w_hh"] = jnp.zeros((1, H + 1, 3 * (H + 1)))
    missing = {"layer_0": other["layer_0"]}
    extra = dict(other, layer_2=other["layer_1"])
    no_bias = {k: {n: v[n] for n in ("w_ih", "w_hh")} for k, v in other.items()}
    for bad, msg in [
        (wrong_shape, "layer_1/w_hh: expected shape"),
        (missing, "missing /layer_1"),
        (extra, "unexpected /layer_2"),
        (no_bias, "missing /layer_0/b_hh"),
    ]:
        with pytest.raises(ValueError, match=msg):
            model.load_params(bad)
        _assert_trees_equal(model.params_tree(), before)  # nothing was loaded

    model.load_params({"params": other})  # linen variables are accepted as well
    _assert_trees_equal(model.params_tree(), other)
    # Plain NNX also works (unchecked): nnx.update with the pure dict.
    nnx.update(model, before)
    _assert_trees_equal(model.params_tree(), before)


def test_dropout_follows_train_eval_and_deterministic():
    x = _x(4)
    # "rbg" keys: threefry's bit generator doubles each compilation; the wiring is the same.
    rngs = nnx.Rngs(params=0, dropout=jax.random.key(1, impl="rbg"))
    model = gnnx.GRU.from_params(_tree(3, num_layers=2), dropout=0.5, rngs=rngs)
    tree = model.params_tree()
    # Jitted: eager dispatch would recompile the scans on every call.
    run = nnx.jit(lambda m, x, **kw: m(x, **kw)[0], static_argnames="deterministic")
    key = jax.random.key(7, impl="rbg")
    want = jax.jit(lambda t, x, k: gru_jax.gru(t, x, dropout=0.5, key=k)[0])(tree, x, key)

    assert model.deterministic is False  # NNX convention: training mode until eval()
    a, b = run(model, x), run(model, x)
    assert float(jnp.abs(a - b).max()) > 1e-3  # a fresh mask per call
    np.testing.assert_allclose(run(model, x, rngs=key), want, **TOL)  # the core's dropout

    model.eval()
    assert model.deterministic is True
    clean = run(model, x)
    assert min(float(jnp.abs(v - clean).max()) for v in (a, b, want)) > 1e-3
    model.train()  # back to training; the call argument overrides the mode
    view = nnx.view(model, deterministic=True)  # a view in eval mode; the model stays as is
    assert view.deterministic is True and model.deterministic is False
    np.testing.assert_array_equal(run(view, x), clean)
    np.testing.assert_array_equal(run(model, x, deterministic=True), clean)
    # Evaluation mode is the plain core, no dropout.
    np.testing.assert_allclose(clean, jax.jit(lambda t, x: gru_jax.gru(t, x)[0])(tree, x), **TOL)


def test_dropout_without_stream_raises_only_when_training():
    tree = _tree(4, num_layers=2)
    x = _x(5)
    for rngs in (None, nnx.Rngs(params=0)):  # no Rngs; an Rngs without dropout/default
        model = gnnx.GRU.from_params(tree, dropout=0.2, rngs=rngs)
        with pytest.raises(ValueError, match="no 'dropout' or 'default' rng stream"):
            model(x)
    model.eval()
    np.testing.assert_array_equal(model(x)[0], gru_jax.gru(model.params_tree(), x)[0])


def test_cell_equals_linen_cell_on_one_tree():
    linen = gru_jax.GRUCell(H, reset_after=False)
    x, h = _x(7, (B, D)), _x(8, (B, H))
    variables = {"params": _cell(5, bias=True)}
    cell = gnnx.GRUCell.from_params(variables, reset_after=False)
    _assert_trees_equal(cell.params_tree(), dict(variables["params"]))
    h_l, _ = linen.apply(variables, h, x)
    h_n, y_n = cell(h, x)
    np.testing.assert_allclose(h_n, h_l, **TOL)
    np.testing.assert_array_equal(h_n, y_n)


def test_cell_in_nnx_rnn_and_bidirectional_equals_gru():
    x = _x(9)
    fwd = gnnx.GRUCell.from_params(_cell(6))
    rev = gnnx.GRUCell.from_params(_cell(7))
    out, _ = gru_jax.gru(stack_cells([fwd.params_tree()]), x)
    np.testing.assert_allclose(nnx.RNN(fwd)(x), out, **TOL)

    bi = nnx.Bidirectional(nnx.RNN(fwd), nnx.RNN(rev), return_carry=True)
    (c_fwd, c_rev), y = bi(x)
    out, h_n = gru_jax.gru(stack_cells([[fwd.params_tree(), rev.params_tree()]]), x)
    np.testing.assert_allclose(y, out, **TOL)
    np.testing.assert_allclose(c_fwd, h_n[0], **TOL)
    np.testing.assert_allclose(c_rev, h_n[1], **TOL)


def test_cell_initialize_carry():
    cell = gnnx.GRUCell(D, H, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(cell.initialize_carry((B, D)), np.zeros((B, H), np.float32))
    ones = nnx.initializers.ones
    np.testing.assert_array_equal(
        cell.initialize_carry((D,), nnx.Rngs(0), carry_init=ones), np.ones((H,), np.float32)
    )
    with pytest.raises(ValueError, match="needs rngs"):
        cell.initialize_carry((B, D), carry_init=ones)
    assert cell.num_feature_axes == 1


@pytest.mark.parametrize(
    "make,msg",
    [
        (lambda: gnnx.GRU(0, H, rngs=nnx.Rngs(0)), "in_features must be an integer >= 1"),
        (lambda: gnnx.GRU(D, H, num_layers=True, rngs=nnx.Rngs(0)), "num_layers"),
        (lambda: gnnx.GRU(D, H, dropout=1.0, rngs=nnx.Rngs(0)), r"dropout must be in \[0, 1\)"),
        (lambda: gnnx.GRUCell(D, -1, rngs=nnx.Rngs(0)), "hidden_size"),
        (lambda: gnnx.GRU.from_params({"w_ih": jnp.zeros((D, 3 * H))}), "keys"),
    ],
)
def test_bad_construction_raises(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


def test_rngs_accepts_an_int_seed_or_a_key_as_flax_modules_do():
    """``rngs=0`` or a bare key is the default stream, as for flax's own NNX modules: the same
    weights as ``nnx.Rngs(0)``, and dropout draws from it."""
    x = jax.random.normal(jax.random.key(1), (2, 5, D))
    want = gnnx.GRU(D, H, num_layers=2, rngs=nnx.Rngs(7)).params_tree()
    for rngs in (7, jax.random.key(7)):
        got = gnnx.GRU(D, H, num_layers=2, rngs=rngs).params_tree()
        jax.tree.map(np.testing.assert_array_equal, got, want)
    cell = gnnx.GRUCell(D, H, rngs=3).params_tree()
    jax.tree.map(
        np.testing.assert_array_equal, cell, gnnx.GRUCell(D, H, rngs=nnx.Rngs(3)).params_tree()
    )
    model = gnnx.GRU(D, H, num_layers=2, dropout=0.5, rngs=0)
    a, _ = model(x)
    b, _ = model(x)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3  # a fresh mask per call, from the stream
    with pytest.raises(TypeError, match=r"rngs must be an nnx\.Rngs, an int seed or a PRNG key"):
        gnnx.GRU(D, H, rngs=1.5)
