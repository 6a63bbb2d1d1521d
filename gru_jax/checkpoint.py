"""Saving and restoring params trees: orbax-checkpoint directories and msgpack bytes.

A params tree (linen ``variables["params"]``, an NNX module's ``params_tree()``,
:func:`gru_jax.interop.from_torch` output) is a plain nested dict of arrays, so both formats
store it as is and it restores into either module::

    from gru_jax import checkpoint
    checkpoint.save("/tmp/gru_ckpt", tree)        # a directory (orbax-checkpoint)
    tree = checkpoint.restore("/tmp/gru_ckpt")
    blob = checkpoint.to_bytes(tree)              # msgpack (flax.serialization)
    tree = checkpoint.from_bytes(blob)

orbax-checkpoint is an optional dependency (the ``checkpoint`` extra, see the README's
Installation section), imported
only by :func:`save` and :func:`restore`; the msgpack functions need only Flax.

Given a ``target``, restoring checks that the stored tree has exactly the target's keys and
shapes and raises ``ValueError`` otherwise (``flax.serialization.from_bytes`` alone would
ignore extra entries and wrong shapes); the arrays take the target's dtypes.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gru_jax import _params


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as err:
        raise ImportError(
            "gru_jax.checkpoint.save/restore need orbax-checkpoint: "
            "pip install 'gru-jax[checkpoint] @ git+https://github.com/gru-jax/gru_jax' "
            "(from a clone: pip install -e '.[checkpoint]'; or pip install orbax-checkpoint); "
            "to_bytes/from_bytes work without it"
        ) from err
    return ocp


def _abs_path(path) -> Path:
    # orbax requires absolute paths.
    return Path(os.fspath(path)).expanduser().resolve()


def save(path, params, *, force: bool = False) -> Path:
    """Saves a params tree to the directory ``path`` with orbax-checkpoint.

    Args:
      path: directory to create (``str`` or ``os.PathLike``; relative paths are resolved).
      params: a pytree of arrays, e.g. a params tree or linen ``{"params": tree}``.
      force: overwrite an existing ``path``.

    Returns:
      The absolute path written; the save is complete when this returns.

    Raises:
      ImportError: if orbax-checkpoint is not installed.
      ValueError: if ``path`` exists and ``force`` is False.
    """
    ocp = _orbax()
    path = _abs_path(path)
    if path.exists() and not force:
        raise ValueError(f"checkpoint path {path} already exists; pass force=True to overwrite")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=force)
        ckptr.wait_until_finished()
    return path


def restore(path, target=None):
    """Restores a params tree saved by :func:`save`.

    Args:
      path: the checkpoint directory.
      target: optional tree of arrays (or ``jax.ShapeDtypeStruct``) with the expected
        structure, e.g. ``model.params_tree()``; the stored tree must match its keys and
        shapes exactly, and the arrays are restored in its dtypes.

    Returns:
      The tree, with ``jax.Array`` leaves.

    Raises:
      ImportError: if orbax-checkpoint is not installed.
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the stored tree does not match ``target``.
    """
    ocp = _orbax()
    path = _abs_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path).item_metadata
        if target is None:
            target = _as_tree(stored)
        elif stored is not None:
            _params.check_same_tree(target, _as_tree(stored), f"checkpoint {path}")
        # Each array onto the target's devices, or this process's first: a checkpoint
        # written by several devices or processes restores on any topology.
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda a: _abstract(a, default), target)
        try:
            return ckptr.restore(path, abstract)
        except ValueError as err:
            raise ValueError(f"checkpoint {path} does not match target: {err}") from err


def _abstract(a, default):
    """``a``'s shape and dtype, on ``a``'s sharding if it is an array's, else on ``default``."""
    sharding = getattr(a, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding):
        sharding = default
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)


def _as_tree(metadata):
    """orbax's TreeMetadata -> nested dicts of leaf metadata (which have ``.shape``)."""
    tree = getattr(metadata, "tree", metadata)
    if hasattr(tree, "items"):
        return {k: _as_tree(v) for k, v in tree.items()}
    return tree


def to_bytes(params) -> bytes:
    """Serializes a params tree with ``flax.serialization.to_bytes`` (msgpack)."""
    from flax import serialization

    return serialization.to_bytes(params)


def from_bytes(data: bytes, target=None):
    """Deserializes :func:`to_bytes` output.

    Args:
      data: the bytes.
      target: optional tree with the expected keys and shapes (as :func:`restore`); the
        arrays are cast to its dtypes.

    Returns:
      The tree with ``jax.Array`` leaves.

    Raises:
      ValueError: if the stored tree does not match ``target`` (keys or shapes).
    """
    from flax import serialization

    tree = serialization.msgpack_restore(data)
    if target is None:
        return jax.tree.map(jnp.asarray, tree)
    _params.check_same_tree(target, tree, "serialized params")
    return jax.tree.map(lambda t, v: jnp.asarray(np.asarray(v), t.dtype), target, tree)
