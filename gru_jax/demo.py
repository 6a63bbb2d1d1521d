"""``python -m gru_jax.demo``: a bidirectional 2-layer GRU speaker classifier on JapaneseVowels.

JapaneseVowels (UCI; Kudo, Toyama & Shimbo 1999): 9 male speakers say the vowels "ae"; each
utterance is 12 LPC cepstrum coefficients over 7 to 29 frames. 270 training and 370 test
utterances; the task is to name the speaker. The ``.ts`` files ship inside the ``sktime``
wheel, so the demo reads them from the installed package and needs no network.

Sequences keep their own lengths: they are zero-padded to the longest one once, and the GRU is
given ``lengths`` so that padding never reaches the hidden state (no truncation, no
resampling). The classifier mean-pools the bidirectional outputs over each sequence's valid
steps and applies a linear layer. Training is jitted per epoch (a ``lax.scan`` over shuffled
minibatches); the run writes an orbax checkpoint and a PNG of the learning curves.

The dataset reader :func:`load_japanese_vowels` is public so that notebooks can reuse it, and
so is :func:`enable_compilation_cache`, which the demo and the notebooks call to turn on JAX's
persistent compilation cache: a second run loads the compiled programs instead of compiling
them again. It changes JAX's global configuration, which the library itself never does: a
program opts in, not ``import gru_jax``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gru_jax._compile_cache import (
    CompileClock,
    default_compilation_cache_dir,
    enable_compilation_cache,
)
from gru_jax._demo_train import (
    compile_programs,
    make_programs,
    new_state,
    require,
    resume,
    run_epochs,
)
from gru_jax._vowels import (
    NUM_CHANNELS,
    NUM_CLASSES,
    DemoError,
    channel_stats,
    dataset_dir,
    load_japanese_vowels,
    normalize,
)
from gru_jax.linen import GRU

__all__ = [
    "NUM_CHANNELS",
    "NUM_CLASSES",
    "DemoError",
    "VowelClassifier",
    "build_parser",
    "channel_stats",
    "dataset_dir",
    "default_compilation_cache_dir",
    "enable_compilation_cache",
    "load_japanese_vowels",
    "main",
    "make_model",
    "normalize",
    "plot_history",
    "restore_checkpoint",
    "save_checkpoint",
    "train",
]


# --------------------------------------------------------------------------------------------
# The model and its training
# --------------------------------------------------------------------------------------------


class VowelClassifier(nn.Module):
    """Bidirectional 2-layer GRU, mean over each sequence's valid steps, linear head.

    Attributes:
      hidden: GRU hidden size per direction.
      dropout: drop probability between the GRU layers and before the head (training only).
    """

    hidden: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, lengths, *, deterministic: bool = True):
        """Logits ``(B, 9)`` for inputs ``x (B, T, 12)`` with valid ``lengths (B,)``."""
        out, _ = GRU(self.hidden, num_layers=2, bidirectional=True, dropout=self.dropout)(
            x, lengths=lengths, deterministic=deterministic
        )
        # `out` is exactly zero at padded steps, so a plain sum is the sum over valid ones.
        pooled = out.sum(axis=1) / lengths[:, None].astype(out.dtype)
        pooled = nn.Dropout(self.dropout)(pooled, deterministic=deterministic)
        return nn.Dense(NUM_CLASSES)(pooled)


def make_model(hidden: int, dropout: float = 0.0) -> VowelClassifier:
    """The demo's classifier (see :class:`VowelClassifier`)."""
    return VowelClassifier(hidden, dropout)


def train(
    *,
    epochs: int,
    seed: int,
    hidden: int,
    lr: float = 1e-2,
    batch_size: int = 30,
    dropout: float = 0.0,
    data_dir=None,
    progress: bool = True,
    state_dir: Path | None = None,
):
    """Trains the classifier; returns ``(params, history, norm)``.

    ``history`` maps ``"loss"``, ``"train_acc"``, ``"test_acc"`` to per-epoch lists (the test
    accuracy is only recorded for the curves; nothing is selected by it). ``norm`` holds the
    training-set channel ``mean`` and ``std`` the inputs were standardized with.

    With a ``state_dir``, the training state (params, optimizer state, the rng key that
    draws each epoch's data order and dropout masks, the epoch and the history) is saved
    there with orbax's ``CheckpointManager`` after every epoch, and a state already there is
    resumed from its last complete checkpoint: a run killed at any point and started again
    ends with the same numbers as one that was never interrupted. orbax writes each
    checkpoint to a temporary folder and renames it when complete, so a partly written one is
    never loaded.
    """
    require("tqdm")  # fail before reading data and compiling, not after, if tqdm is missing
    (x_tr, len_tr, y_tr), test, norm = _standardized_splits(data_dir)
    model = make_model(hidden, dropout)
    key, init_key = jax.random.split(jax.random.key(seed))
    clock = CompileClock()
    with clock:
        # Jitted, init compiles once instead of op by op: about half the time on CPU.
        params = jax.jit(model.init)(init_key, x_tr[:1], len_tr[:1])["params"]
    batch_size = min(batch_size, len(y_tr))
    tx = _optimizer(lr, epochs * (len(y_tr) // batch_size))
    data = tuple(jnp.asarray(a) for a in (x_tr, len_tr, y_tr))
    programs = make_programs(model, tx, data, batch_size)

    state = new_state(params, tx.init(params), key, epochs)
    manager, done, state = resume(state_dir, state, epochs, progress)
    if done < epochs:
        # The clock holds the init's compile already: its report counts both.
        programs = compile_programs(programs, state, test, clock, progress)
    params, curves = run_epochs(
        programs, state, test, done=done, epochs=epochs, manager=manager, progress=progress
    )
    history = {name: [float(v) for v in curves[name]] for name in curves}
    history.update(num_test=len(test[2]), dropout=dropout)
    return params, history, norm


def _standardized_splits(data_dir):
    """The train and test splits ``(x, lengths, y)``, both standardized with the training
    set's channel statistics; returns ``(train, test, {"mean": ..., "std": ...})``."""
    x_tr, len_tr, y_tr = load_japanese_vowels("train", data_dir)
    x_te, len_te, y_te = load_japanese_vowels("test", data_dir)
    mean, std = channel_stats(x_tr, len_tr)
    x_tr, x_te = normalize(x_tr, len_tr, mean, std), normalize(x_te, len_te, mean, std)
    return (x_tr, len_tr, y_tr), (x_te, len_te, y_te), {"mean": mean, "std": std}


def _optimizer(lr: float, total_steps: int):
    """AdamW whose rate decays from ``lr`` to 5% of it along a cosine over ``total_steps``."""
    schedule = optax.cosine_decay_schedule(lr, max(1, total_steps), alpha=0.05)
    return optax.adamw(schedule, weight_decay=1e-4)


def save_checkpoint(path: Path, params, norm, config: dict) -> None:
    """Writes ``{"params", "norm"}`` with orbax to ``path``, and ``config`` to ``path.json``."""
    ocp = require("orbax.checkpoint")
    path = Path(path).absolute()  # orbax wants absolute paths
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, {"params": params, "norm": norm}, force=True)
        checkpointer.wait_until_finished()
    _write_atomically(path.with_suffix(".json"), json.dumps(config, indent=2) + "\n")


def restore_checkpoint(path: Path):
    """Reads what :func:`save_checkpoint` wrote; returns ``(params, norm, config)``.

    Rebuild the model with ``make_model(config["hidden"])`` and standardize inputs with
    :func:`normalize` and ``norm["mean"]``/``norm["std"]`` before calling it.
    """
    ocp = require("orbax.checkpoint")
    path = Path(path).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(path)
    config = json.loads(path.with_suffix(".json").read_text())
    norm = {k: np.asarray(v) for k, v in state["norm"].items()}
    return state["params"], norm, config


def plot_history(history: dict, path: Path) -> None:
    """Saves the learning curves (loss; train and test accuracy) as a PNG."""
    # A bare Figure draws to a file without pyplot, so no GUI backend is chosen or changed.
    figure_module = require("matplotlib.figure")

    epochs = np.arange(1, len(history["loss"]) + 1)
    fig = figure_module.Figure(figsize=(10, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, history["loss"], color="tab:blue")
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log")
    train_label = "train (with dropout)" if history.get("dropout") else "train"
    ax_acc.plot(epochs, history["train_acc"], label=train_label)
    ax_acc.plot(epochs, history["test_acc"], label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0.0, 1.02))
    ax_acc.legend(loc="lower right")
    fig.suptitle("gru_jax on JapaneseVowels: bidirectional 2-layer GRU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1); got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gru_jax.demo",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Train a bidirectional 2-layer gru_jax GRU to tell 9 speakers apart from their "
            "JapaneseVowels utterances (read from the installed sktime package), print the "
            "test accuracy, and save an orbax checkpoint and a learning-curve PNG."
        ),
    )
    parser.add_argument(
        "--epochs", type=_positive_int, default=30, help="passes over the 270 training cases"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of init, shuffling, dropout")
    parser.add_argument(
        "--hidden", type=_positive_int, default=32, help="GRU hidden size per direction"
    )
    parser.add_argument(
        "--dropout",
        type=_probability,
        default=0.0,
        help="dropout between the GRU layers and before the head; 0 measured best",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs"),
        help="folder for the checkpoint (checkpoint/, checkpoint.json) and learning_curves.png",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with JapaneseVowels_{TRAIN,TEST}.ts; None: the sktime package's copy",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--compile-cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of JAX's persistent compilation cache, from which a second run loads "
        "what the first compiled; None: $JAX_COMPILATION_CACHE_DIR if set, else "
        "$XDG_CACHE_HOME/gru_jax/jax_cache or ~/.cache/gru_jax/jax_cache",
    )
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="leave JAX's compilation cache settings as they are (no cache unless "
        "$JAX_COMPILATION_CACHE_DIR is set)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="start over in --out, deleting a finished or unfinished run there (without it, "
        "a finished run is never overwritten and an unfinished one is resumed)",
    )
    return parser


class _FinishedRun(Exception):
    """``--out`` holds a finished run (its ``checkpoint.json``): it is reported, not redone."""


# What a resumed run must share with the run it resumes.
_RUN_KEYS = ("hidden", "dropout", "epochs", "seed", "data_dir")


def _prepare_out(out: Path, run: dict, force: bool) -> Path:
    """Checks ``out`` against a run already there; returns the training-state folder.

    A finished run (its ``checkpoint.json``) is never overwritten without ``force``; an
    unfinished one (its ``train_state/``) is resumed when it has the same settings.
    """
    state_dir, run_file = out / "train_state", out / "train_state.json"
    finished = out / "checkpoint.json"
    if force:
        for path in (state_dir, out / "checkpoint"):
            shutil.rmtree(path, ignore_errors=True)
        for path in (run_file, finished, out / "learning_curves.png"):
            path.unlink(missing_ok=True)
    elif finished.exists():
        raise _FinishedRun(finished)
    elif run_file.exists():
        before = json.loads(run_file.read_text())
        if before != run:
            diff = ", ".join(
                f"{k}: {before.get(k)} -> {run[k]}" for k in run if before.get(k) != run[k]
            )
            raise DemoError(
                f"{out} holds an unfinished run with other settings ({diff}); rerun with the "
                "same settings to resume it, or pass --force to start over"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DemoError(f"cannot create the output folder {out}: {err}") from None
    _write_atomically(run_file, json.dumps(run, indent=2) + "\n")
    return state_dir


def _enable_cache(path: Path | None) -> None:
    """:func:`enable_compilation_cache`, its folder's errors as a :class:`DemoError`."""
    try:
        enable_compilation_cache(path)
    except OSError as err:
        raise DemoError(
            f"cannot create the compilation cache folder: {err}; pass --compile-cache DIR "
            "or --no-compile-cache"
        ) from None


def _write_atomically(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename: never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _command(argv: Sequence[str] | None, *extra: str) -> str:
    """This run's command with ``extra`` added, to copy as it is from the working folder:
    ``make demo`` cannot pass options on, so the command names this Python (``.venv/...``)."""
    python = sys.executable
    if Path(python).is_relative_to(Path.cwd()):
        # A path, never a bare name, which the shell would look up in PATH instead.
        python = os.path.join(".", Path(python).relative_to(Path.cwd()))
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join([python, "-m", "gru_jax.demo", *args, *extra])


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo; returns the process exit code (1 on a :class:`DemoError`)."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        # Fail before training, not after it, if a package or the data is missing.
        for module in ("tqdm", "matplotlib.figure", "orbax.checkpoint"):
            require(module)
        if args.data_dir is None:
            dataset_dir()
        run = {k: getattr(args, k) for k in _RUN_KEYS}
        run["data_dir"] = None if args.data_dir is None else str(args.data_dir)
        state_dir = _prepare_out(args.out, run, args.force)
        if not args.no_compile_cache:
            _enable_cache(args.compile_cache)
        params, history, norm = train(
            epochs=args.epochs,
            seed=args.seed,
            hidden=args.hidden,
            dropout=args.dropout,
            data_dir=args.data_dir,
            progress=not args.quiet,
            state_dir=state_dir,
        )
        config = {
            "hidden": args.hidden,
            "dropout": args.dropout,
            "epochs": args.epochs,
            "seed": args.seed,
            "test_accuracy": history["test_acc"][-1],
            "history": {k: history[k] for k in ("loss", "train_acc", "test_acc")},
        }
        plot_history(history, args.out / "learning_curves.png")
        # checkpoint.json, written last, marks the run finished; the training state goes.
        save_checkpoint(args.out / "checkpoint", params, norm, config)
        shutil.rmtree(state_dir, ignore_errors=True)
        (args.out / "train_state.json").unlink(missing_ok=True)
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except _FinishedRun as done:
        (path,) = done.args
        accuracy = json.loads(path.read_text()).get("test_accuracy")
        print(
            f"{args.out} holds a finished run (test accuracy {accuracy:.2%}, {path}); it is "
            f"left as it is. To train again there: {_command(argv, '--force')} (or give "
            "--out another folder)"
        )
        return 0
    acc = history["test_acc"][-1]
    n_test = history["num_test"]
    print(f"test accuracy: {acc:.2%} ({round(acc * n_test)}/{n_test})")
    print(f"final training loss: {history['loss'][-1]:.6f}")
    print(f"saved {args.out / 'checkpoint'} and {args.out / 'learning_curves.png'}")
    print(f"total time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
