"""gru_jax.checkpoint: orbax directories and msgpack bytes round-trip params trees exactly."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gru_jax
from gru_jax import checkpoint
from gru_jax import nnx as gnnx

D, H = 3, 4


def _tree(seed=0, **options):
    """A stack tree with NumPy-drawn values (shapes from init_gru, nothing compiled)."""
    shapes = jax.eval_shape(lambda k: gru_jax.init_gru(k, D, H, **options), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(np.float32)), shapes)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _wrong_trees(tree):
    extra = dict(tree, layer_2=tree["layer_1"])
    missing = {"layer_0": tree["layer_0"]}
    shape = jax.tree.map(lambda a: a, tree)
    shape["layer_1"]["w_hh"] = jnp.zeros((2, H, 3 * H + 3))
    return [(extra, "missing /layer_2"), (missing, "unexpected /layer_1"), (shape, "w_hh")]


def test_orbax_round_trip_is_exact_and_checked(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    tree = _tree(num_layers=2, bidirectional=True)
    path = checkpoint.save(tmp_path / "ckpt", tree)
    assert path.is_absolute() and path.is_dir()

    _assert_trees_equal(checkpoint.restore(path), tree)
    model = gnnx.GRU.from_params(tree)
    _assert_trees_equal(checkpoint.restore(path, target=model.params_tree()), tree)
    # A target sets the dtypes; jax.ShapeDtypeStruct targets work too.
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), tree)
    half = checkpoint.restore(str(path), target=abstract)
    assert {a.dtype for a in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(
        half["layer_0"]["w_ih"], tree["layer_0"]["w_ih"].astype(jnp.bfloat16)
    )

    for target, msg in _wrong_trees(tree):
        with pytest.raises(ValueError, match=msg):
            checkpoint.restore(path, target=target)
    with pytest.raises(ValueError, match="already exists"):
        checkpoint.save(path, tree)
    other = _tree(1, num_layers=2, bidirectional=True)
    checkpoint.save(path, other, force=True)
    _assert_trees_equal(checkpoint.restore(path), other)
    with pytest.raises(FileNotFoundError):
        checkpoint.restore(tmp_path / "nothing")


def test_msgpack_round_trip_is_exact_and_checked():
    tree = _tree(2, num_layers=2, bidirectional=True)
    data = checkpoint.to_bytes({"params": tree})
    _assert_trees_equal(checkpoint.from_bytes(data), {"params": tree})
    _assert_trees_equal(checkpoint.from_bytes(data, target={"params": tree}), {"params": tree})

    cell = {k: v[0] for k, v in _tree(3, bias=False)["layer_0"].items()}
    restored = checkpoint.from_bytes(checkpoint.to_bytes(cell))
    _assert_trees_equal(restored, cell)
    # Restored weights run: the same numbers as the original.
    x = jnp.asarray(np.ones((2, D), np.float32))
    h = jnp.zeros((2, H), jnp.float32)
    np.testing.assert_array_equal(gru_jax.gru_step(restored, h, x), gru_jax.gru_step(cell, h, x))

    data = checkpoint.to_bytes(tree)
    for target, msg in _wrong_trees(tree):
        # flax.serialization.from_bytes alone would accept all three silently.
        with pytest.raises(ValueError, match=msg):
            checkpoint.from_bytes(data, target=target)


def test_missing_orbax_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install -e '\.\[checkpoint\]'"):
        checkpoint.save(tmp_path / "c", {"w": jnp.zeros(2)})
    with pytest.raises(ImportError, match="orbax-checkpoint"):
        checkpoint.restore(tmp_path / "c")
