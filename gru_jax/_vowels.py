"""The JapaneseVowels data of the demo: reading the ``.ts`` files that ship with sktime, and
standardizing them (re-exported by :mod:`gru_jax.demo`, which notebooks use).

JapaneseVowels (UCI; Kudo, Toyama & Shimbo 1999): 9 male speakers say the vowels "ae"; each
utterance is 12 LPC cepstrum coefficients over 7 to 29 frames; 270 training and 370 test
utterances.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

NUM_CHANNELS = 12
NUM_CLASSES = 9
INSTALL_HINT = (
    "make demo (from a clone), or pip install -e '.[demo]', or "
    "pip install 'gru-jax[demo] @ git+https://github.com/gru-jax/gru_jax'"
)


class DemoError(Exception):
    """A problem the user can fix (a missing package, a corrupt file); printed as one line."""


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


def dataset_dir() -> Path:
    """Returns the folder of the JapaneseVowels ``.ts`` files inside the installed sktime.

    Raises:
      DemoError: if sktime is not installed.
    """
    # find_spec locates the package without importing it (importing sktime takes seconds).
    try:
        spec = importlib.util.find_spec("sktime")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DemoError(
            f"the JapaneseVowels data ships with the sktime package, which is not installed: "
            f"run {INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets/data/JapaneseVowels"


def _parse_ts(path: Path) -> tuple[list[np.ndarray], list[str]]:
    """Parses a multivariate ``.ts`` file into per-case ``(T_i, C)`` arrays and labels.

    The format: ``#`` comment lines, ``@key value`` header lines ending at ``@data``, then one
    case per line: the channels separated by ``:``, each a comma-separated series, and the
    class label last.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DemoError(f"dataset file {path} is missing; reinstall sktime") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DemoError(f"cannot read dataset file {path}: {err}") from None

    def bad(lineno: int, problem: str) -> DemoError:
        return DemoError(f"corrupt dataset file {path}, line {lineno}: {problem}")

    header: dict[str, str] = {}
    series: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if not line.startswith("@"):
                raise bad(lineno, "expected a '@' header line before '@data'")
            key, _, value = line[1:].partition(" ")
            header[key.lower()] = value.strip()
            in_data = key.lower() == "data"
            if in_data:
                # "@classLabel true 1 2 ... 9" declares the labels the cases may carry.
                words = header.get("classlabel", "").split()
                declared = words[1:] if words[:1] == ["true"] else []
            continue
        *channels, label = line.split(":")
        if len(channels) != NUM_CHANNELS:
            raise bad(lineno, f"expected {NUM_CHANNELS} channels, found {len(channels)}")
        try:
            values = [np.array(c.split(","), dtype=np.float32) for c in channels]
        except ValueError as err:
            raise bad(lineno, f"not a number: {err}") from None
        steps = {len(v) for v in values}
        if len(steps) != 1:
            raise bad(lineno, f"channels have different lengths {sorted(steps)}")
        case = np.stack(values, axis=1)
        if not np.isfinite(case).all():
            raise bad(lineno, "non-finite value")
        label = label.strip()
        if declared and label not in declared:
            raise bad(lineno, f"class label {label!r} is not among the declared {declared}")
        series.append(case)
        labels.append(label)
    if not in_data:
        raise DemoError(f"corrupt dataset file {path}: no '@data' section")
    if not series:
        raise DemoError(f"corrupt dataset file {path}: no cases after '@data'")
    return series, labels


def load_japanese_vowels(split: str, data_dir: str | os.PathLike | None = None):
    """Reads one split of JapaneseVowels, zero-padded to its longest sequence.

    Args:
      split: ``"train"`` (270 utterances) or ``"test"`` (370).
      data_dir: folder holding ``JapaneseVowels_{TRAIN,TEST}.ts``; ``None``: the copy inside
        the installed sktime package.

    Returns:
      ``(x, lengths, y)``: ``x`` float32 ``(N, T, 12)``, zero at steps ``t >= lengths[i]``
      (``T`` is the split's longest utterance: 26 in train, 29 in test); ``lengths`` int32
      ``(N,)`` in ``[7, 29]``;
      ``y`` int32 ``(N,)``, the speaker in ``0..8`` (the file's labels ``1..9`` minus one).

    Raises:
      ValueError: for an unknown ``split``.
      DemoError: if sktime is missing (and no ``data_dir`` is given) or a file is corrupt.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    folder = dataset_dir() if data_dir is None else Path(data_dir)
    path = folder / f"JapaneseVowels_{split.upper()}.ts"
    series, labels = _parse_ts(path)
    try:
        y = np.array([int(label) - 1 for label in labels], dtype=np.int32)
    except ValueError as err:
        raise DemoError(f"corrupt dataset file {path}: non-integer class label ({err})") from None
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise DemoError(f"corrupt dataset file {path}: class labels must be 1..{NUM_CLASSES}")
    lengths = np.array([len(s) for s in series], dtype=np.int32)
    x = np.zeros((len(series), int(lengths.max()), NUM_CHANNELS), dtype=np.float32)
    for i, s in enumerate(series):
        x[i, : len(s)] = s
    return x, lengths, y


def channel_stats(x: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over the valid (unpadded) steps only.

    Returns:
      ``(mean, std)``, each float32 ``(12,)``.
    """
    valid = np.arange(x.shape[1])[None, :] < lengths[:, None]
    frames = x[valid]
    return frames.mean(0).astype(np.float32), (frames.std(0) + 1e-6).astype(np.float32)


def normalize(x: np.ndarray, lengths: np.ndarray, mean: np.ndarray, std: np.ndarray):
    """Standardizes channels, keeping padded steps at exactly zero."""
    valid = np.arange(x.shape[1])[None, :, None] < lengths[:, None, None]
    return np.where(valid, (x - mean) / std, 0.0).astype(np.float32)
