"""Flax's own GRU cells <-> gru_jax cell trees, exactly; stack_cells."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gru_jax
from gru_jax import nnx as gnnx
from gru_jax.interop import (
    from_flax_linen_gru_cell,
    from_flax_nnx_gru_cell,
    stack_cells,
    to_flax_linen_gru_cell,
)

D, H, T, B = 3, 4, 5, 2
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _x(seed, shape):
    # NumPy draws: jax.random would compile a kernel per shape, the bulk of a test's time here.
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _random_like(tree, seed):
    """Random values (non-zero biases too, so every bias's place in a conversion matters) for
    a tree of shapes: Flax's own init would compile its random kernels, most of a test's time."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(rng.normal(0.0, 0.5, a.shape).astype(np.float32)), tree
    )


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_linen_gru_cell_converts_exactly_both_ways():
    x, h = _x(0, (B, T, D)), _x(1, (B, H))
    flax_rnn = nn.RNN(nn.GRUCell(H))
    shapes = jax.eval_shape(lambda k: flax_rnn.init(k, x, initial_carry=h), jax.random.key(2))
    variables = _random_like(shapes, 2)
    # nn.RNN's {"params": {"cell": ...}} is unwrapped.
    cell = from_flax_linen_gru_cell(variables)
    assert jax.tree.map(jnp.shape, cell) == {
        "w_ih": (D, 3 * H),
        "w_hh": (H, 3 * H),
        "b_ih": (3 * H,),
        "b_hh": (3 * H,),
    }
    np.testing.assert_array_equal(cell["b_hh"][: 2 * H], 0.0)  # Flax has no b_hr, b_hz

    # The whole sequence, through gru_jax's scanned GRU (one layer = stack_cells([cell])).
    # Jitted: eager dispatch compiles op by op and would dominate the time.
    carry, y = jax.jit(lambda v: flax_rnn.apply(v, x, initial_carry=h, return_carry=True))(
        variables
    )
    out, h_n = jax.jit(gru_jax.gru)(stack_cells([cell]), x, h[None])
    np.testing.assert_allclose(out, y, **TOL)
    np.testing.assert_allclose(h_n[0], carry, **TOL)

    # Back to Flax: bit-exact when b_hr = b_hz = 0 (as after the conversion).
    _assert_trees_equal(to_flax_linen_gru_cell(cell), variables["params"]["cell"])


@pytest.mark.parametrize("bias", [True, False])
def test_torch_style_cell_exports_to_linen_gru_cell(bias):
    """A cell with b_hr, b_hz != 0 (torch's) folds them into Flax's input biases."""
    x, h = _x(3, (B, D)), _x(4, (B, H))
    shapes = jax.eval_shape(lambda k: gru_jax.init_cell(k, D, H, bias=bias), jax.random.key(5))
    cell = _random_like(shapes, 5)
    want = jax.jit(gru_jax.gru_step)(cell, h, x)
    flax_params = to_flax_linen_gru_cell({"params": cell})
    got, _ = jax.jit(nn.GRUCell(H).apply)({"params": flax_params}, h, x)
    np.testing.assert_allclose(got, want, **TOL)
    assert float(jnp.abs(got - h).max()) > 1e-2


def test_nnx_gru_cell_converts_exactly_and_lacks_b_hn():
    x = _x(6, (B, T, D))
    flax_cell = nnx.eval_shape(lambda: nnx.GRUCell(D, H, rngs=nnx.Rngs(0)))
    nnx.update(flax_cell, _random_like(nnx.state(flax_cell, nnx.Param).to_pure_dict(), 6))
    cell = from_flax_nnx_gru_cell(flax_cell)
    np.testing.assert_array_equal(cell["b_hh"], 0.0)  # nnx.GRUCell has no recurrent bias
    np.testing.assert_array_equal(cell["b_ih"], flax_cell.dense_i.bias[...])
    # The module, its Param state and the state's pure dict convert alike.
    state = nnx.state(flax_cell, nnx.Param)
    _assert_trees_equal(from_flax_nnx_gru_cell(state), cell)
    _assert_trees_equal(from_flax_nnx_gru_cell(state.to_pure_dict()), cell)

    # Sequence level, in nnx.RNN, against our nnx cell and our scanned GRU.
    run = nnx.jit(lambda c, x: nnx.RNN(c)(x))
    y = run(flax_cell, x)
    ours = gnnx.GRUCell.from_params(cell)
    np.testing.assert_allclose(run(ours, x), y, **TOL)
    out, _ = jax.jit(gru_jax.gru)(stack_cells([cell]), x)
    np.testing.assert_allclose(out, y, **TOL)


@pytest.mark.parametrize(
    "tree,msg",
    [
        ({"ir": {"kernel": np.zeros((D, H))}}, "not a Flax GRUCell params tree"),
        (
            {
                **{g: {"kernel": np.zeros((D, H)), "bias": np.zeros(H)} for g in ("ir", "iz")},
                "in": {"kernel": np.zeros((D, H)), "bias": np.zeros(H)},
                "hr": {"kernel": np.zeros((H, H))},
                "hz": {"kernel": np.zeros((H, H)), "bias": np.zeros(H)},  # extra bias
                "hn": {"kernel": np.zeros((H, H)), "bias": np.zeros(H)},
            },
            r"hz: keys \['bias', 'kernel'\], expected \['kernel'\]",
        ),
        (
            {
                **{g: {"kernel": np.zeros((D, H)), "bias": np.zeros(H)} for g in ("ir", "iz")},
                "in": {"kernel": np.zeros((D, H + 1)), "bias": np.zeros(H)},
                "hr": {"kernel": np.zeros((H, H))},
                "hz": {"kernel": np.zeros((H, H))},
                "hn": {"kernel": np.zeros((H, H)), "bias": np.zeros(H)},
            },
            "differ in shape",
        ),
    ],
)
def test_bad_linen_tree_raises(tree, msg):
    with pytest.raises(ValueError, match=msg):
        from_flax_linen_gru_cell(tree)


def test_bad_nnx_input_and_cells_raise():
    odd = nnx.eval_shape(lambda: nnx.GRUCell(D, H, gate_fn=jax.nn.hard_sigmoid, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="gate_fn must be the default sigmoid"):
        from_flax_nnx_gru_cell(odd)
    with pytest.raises(ValueError, match="expected"):
        from_flax_nnx_gru_cell({"dense_i": {"kernel": np.zeros((D, 3 * H))}})
    with pytest.raises(ValueError, match="must have shape"):
        to_flax_linen_gru_cell({"w_ih": jnp.zeros((D, 3 * H)), "w_hh": jnp.zeros((H, 3 * H + 1))})


def test_stack_cells_builds_and_checks_stacks():
    def cell(seed, d):
        shapes = {"w_ih": (d, 3 * H), "w_hh": (H, 3 * H), "b_ih": (3 * H,), "b_hh": (3 * H,)}
        return _random_like(
            {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}, seed
        )

    c = [cell(i, D if i < 2 else 2 * H) for i in range(4)]
    tree = stack_cells([[c[0], c[1]], [c[2], c[3]]])
    assert tree["layer_1"]["w_ih"].shape == (2, 2 * H, 3 * H)
    _assert_trees_equal(gru_jax.cell_of(tree, 1, 1), c[3])  # cell_of is the inverse
    unbiased = {k: c[1][k] for k in ("w_ih", "w_hh")}
    with pytest.raises(ValueError, match="same keys"):
        stack_cells([[c[0], unbiased]])
    with pytest.raises(ValueError, match="do not form a stack"):
        stack_cells([c[0], c[1]])  # layer 1 would need input size H, not D
    with pytest.raises(ValueError, match="non-empty sequence"):
        stack_cells([])
