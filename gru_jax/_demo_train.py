"""The demo's epoch loop: its two jitted programs, and a training state that survives a kill.

:func:`gru_jax.demo.train` builds the data, the model and the optimizer and hands them here.
One program trains a whole epoch (a ``lax.scan`` over shuffled minibatches, one dispatch per
epoch); the other measures the test accuracy. After every epoch the training state (params,
optimizer state, the rng key that draws each epoch's data order and dropout masks, and the
per-epoch curves) is saved with orbax's ``CheckpointManager``; a run started again in the same
folder restores the last complete checkpoint and goes on from there, to the same numbers.

Also holds :func:`require`, the demo's import of a package from its ``[demo]`` extra.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import optax

from gru_jax._compile_cache import CompileClock
from gru_jax._vowels import INSTALL_HINT, DemoError

# The per-epoch curves of the training state, in the order the history lists them.
CURVES = ("loss", "train_acc", "test_acc")


def require(module: str):
    """Imports ``module``, one of the ``[demo]`` extra's packages.

    Raises:
      DemoError: if it is not installed, saying what to install.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DemoError(f"the demo needs {module.split('.')[0]}: run {INSTALL_HINT}") from None


class Programs(NamedTuple):
    """The two programs of the loop, jitted (or compiled, see :func:`compile_programs`).

    Attributes:
      train_epoch: ``(params, opt_state, key) -> (params, opt_state, mean loss, mean acc)``.
      accuracy: ``(params, x, lengths, y) -> accuracy``.
    """

    train_epoch: Callable
    accuracy: Callable


def make_programs(model, tx, data: tuple, batch_size: int) -> Programs:
    """The jitted epoch of ``model`` trained by ``tx`` on ``data``, and its accuracy.

    Args:
      model: the flax classifier, ``model.apply(variables, x, lengths, ...)`` its logits.
      tx: the optax optimizer.
      data: the training set ``(x (N, T, 12), lengths (N,), y (N,))`` as JAX arrays.
      batch_size: cases per step; an epoch is ``N // batch_size`` steps, the rest left out.
    """
    steps_per_epoch = len(data[2]) // batch_size

    def loss_fn(p, x, lengths, y, k):
        logits = model.apply({"params": p}, x, lengths, deterministic=False, rngs={"dropout": k})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits.argmax(-1) == y).mean()

    @jax.jit
    def train_epoch(p, s, k):
        # One dispatch per epoch: the shuffled minibatches are scanned inside the jit.
        perm_key, drop_key = jax.random.split(k)
        idx = jax.random.permutation(perm_key, len(data[2]))[: steps_per_epoch * batch_size]
        batches = tuple(a[idx].reshape(steps_per_epoch, batch_size, *a.shape[1:]) for a in data)
        drop_keys = jax.random.split(drop_key, steps_per_epoch)

        def step(carry, batch):
            p, s = carry
            *b, k = batch
            (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, *b, k)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), (loss, acc)

        (p, s), (loss, acc) = jax.lax.scan(step, (p, s), (*batches, drop_keys))
        return p, s, loss.mean(), acc.mean()

    @jax.jit
    def accuracy(p, x, lengths, y):
        return (model.apply({"params": p}, x, lengths).argmax(-1) == y).mean()

    return Programs(train_epoch, accuracy)


def compile_programs(
    programs: Programs, state: dict, test: tuple, clock: CompileClock, progress: bool
) -> Programs:
    """Both programs compiled ahead of the loop for ``state``'s arrays and the ``test`` set,
    timed by ``clock`` (which may already hold the init's compile), its report printed."""
    if progress:
        print("compiling the training epoch and the test accuracy (once per run)...", flush=True)
    params, opt_state, key = state["params"], state["opt_state"], _key(state)
    with clock:
        train_epoch = programs.train_epoch.lower(params, opt_state, key).compile()
        accuracy = programs.accuracy.lower(params, *test).compile()
    if progress:
        print(clock.report(), flush=True)
    return Programs(train_epoch, accuracy)


def new_state(params, opt_state, key, epochs: int) -> dict:
    """The training state before the first epoch, its curves zero for all ``epochs``."""
    curves = {name: np.zeros(epochs, np.float32) for name in CURVES}
    return _state(params, opt_state, key, curves)


def _state(params, opt_state, key, curves: dict) -> dict:
    # The key as its raw data: orbax stores arrays, not typed rng keys.
    state = {"params": params, "opt_state": opt_state, "key": jax.random.key_data(key)}
    state["curves"] = curves
    return state


def _key(state: dict):
    return jax.random.wrap_key_data(state["key"])


def resume(state_dir: Path | None, state: dict, epochs: int, progress: bool):
    """Opens the training state of ``state_dir``; returns ``(manager, done, state)``.

    Where ``state_dir`` holds a complete checkpoint, ``state`` is replaced by the last one
    and ``done`` is its epoch; otherwise ``done`` is 0 and ``state`` is returned as it is.
    Without a ``state_dir`` the manager is ``None``: nothing is saved.
    """
    if state_dir is None:
        return None, 0, state
    manager = _state_manager(state_dir)
    done = manager.latest_step()
    if done is None:
        return manager, 0, state
    state = _restore_state(manager, done, state)
    if progress:
        print(f"resuming after epoch {done} of {epochs} from {state_dir}")
    return manager, done, state


def run_epochs(
    programs: Programs,
    state: dict,
    test: tuple,
    *,
    done: int,
    epochs: int,
    manager=None,
    progress: bool = True,
):
    """Trains epochs ``done`` to ``epochs``, saving the state after each with ``manager``
    (where there is one, which is closed at the end); returns ``(params, curves)``.

    ``programs`` are those of :func:`compile_programs` unless ``done == epochs``, where no
    epoch runs; ``test`` is the test set ``(x, lengths, y)`` whose accuracy is recorded.
    """
    tqdm = require("tqdm").tqdm
    params, opt_state, curves = state["params"], state["opt_state"], state["curves"]
    key = _key(state)
    bar = tqdm(
        range(done, epochs), desc="training", unit="epoch", disable=not progress,
        initial=done, total=epochs,
    )  # fmt: skip
    for epoch in bar:
        key, k = jax.random.split(key)
        params, opt_state, loss, acc = programs.train_epoch(params, opt_state, k)
        test_acc = float(programs.accuracy(params, *test))
        curves["loss"][epoch], curves["train_acc"][epoch] = float(loss), float(acc)
        curves["test_acc"][epoch] = test_acc
        bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{float(acc):.3f}", test=f"{test_acc:.3f}")
        if manager is not None:
            state = _state(params, opt_state, key, curves)
            manager.save(epoch + 1, args=_ocp().args.StandardSave(state))
    bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    return params, curves


def _ocp():
    return require("orbax.checkpoint")


def _state_manager(state_dir: Path):
    """orbax's ``CheckpointManager`` of the training state, one checkpoint per epoch."""
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(state_dir).absolute(), options=options)


def _restore_state(manager, step: int, like):
    """The state saved after epoch ``step``, with ``like``'s tree structure and dtypes."""
    ocp = _ocp()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), like)
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    # NumPy, like the curves: orbax places its arrays on a device explicitly, which a fresh
    # run's state is not, and the programs compiled for them would differ from a fresh run's
    # and miss the compilation cache.
    restored = jax.tree.map(np.asarray, restored)
    restored["curves"] = {k: np.array(v, np.float32) for k, v in restored["curves"].items()}
    return restored
