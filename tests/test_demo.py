"""The demo: its JapaneseVowels reader, its one-line errors, and a short end-to-end run."""

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gru_jax import demo

# find_spec, not importorskip: importing sktime takes seconds and the demo never does.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sktime") is None,
    reason="the demo's data ships with sktime (pip install 'gru-jax[demo]')",
)


@pytest.fixture(scope="module")
def splits():
    return {split: demo.load_japanese_vowels(split) for split in ("train", "test")}


def test_reader_sizes_and_labels(splits):
    (x_tr, len_tr, y_tr), (x_te, len_te, y_te) = splits["train"], splits["test"]
    # UCI: 270 training and 370 test utterances of 12 LPC coefficients, 7 to 29 frames.
    assert x_tr.shape == (270, 26, 12) and x_te.shape == (370, 29, 12)
    assert x_tr.dtype == np.float32 and len_tr.dtype == np.int32 and y_tr.dtype == np.int32
    assert (len_tr.min(), len_tr.max()) == (7, 26)
    assert (len_te.min(), len_te.max()) == (7, 29)
    # 9 speakers, 30 training utterances each; the test set is uneven (24 to 88).
    np.testing.assert_array_equal(np.bincount(y_tr), np.full(9, 30))
    counts = np.bincount(y_te, minlength=9)
    assert counts.sum() == 370 and counts.min() == 24 and counts.max() == 88


def test_reader_values(splits):
    x, lengths, y = splits["train"]
    # The first case of JapaneseVowels_TRAIN.ts: 20 frames, speaker 1; its first frame's
    # first three coefficients, and the last frame of channel 0.
    assert lengths[0] == 20 and y[0] == 0
    np.testing.assert_allclose(x[0, 0, :3], [1.860936, -0.207383, 0.261557], rtol=1e-6)
    assert x[0, 19, 0] == np.float32(1.261441)
    # Padding is exactly zero, and real frames are not.
    steps = np.arange(x.shape[1])
    assert np.all(x[steps[None, :] >= lengths[:, None]] == 0.0)
    assert np.all(np.abs(x[steps[None, :] < lengths[:, None]]).sum(-1) > 0.0)


def test_normalize_uses_real_frames_only(splits):
    x, lengths, _ = splits["train"]
    mean, std = demo.channel_stats(x, lengths)
    z = demo.normalize(x, lengths, mean, std)
    real = np.arange(x.shape[1])[None, :] < lengths[:, None]
    np.testing.assert_allclose(z[real].mean(0), np.zeros(12), atol=1e-4)
    np.testing.assert_allclose(z[real].std(0), np.ones(12), rtol=1e-3)
    assert np.all(z[~real] == 0.0)


def test_unknown_split():
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        demo.load_japanese_vowels("validation")


def _copy_dataset(tmp_path):
    for name in ("JapaneseVowels_TRAIN.ts", "JapaneseVowels_TEST.ts"):
        shutil.copy(demo.dataset_dir() / name, tmp_path / name)
    return tmp_path / "JapaneseVowels_TRAIN.ts"


def _corrupt_case(path, edit):
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().lower() == "@data") + 1
    lines[first] = edit(lines[first])
    path.write_text("\n".join(lines) + "\n")
    return first + 1  # 1-based line number


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda line: line.replace("1.860936", "1.86x936", 1), "not a number"),
        (lambda line: line.split(":", 1)[1], "expected 12 channels, found 11"),
        (lambda line: line.replace(",1.261441:", ":", 1), "channels have different lengths"),
        (lambda line: line.rsplit(":", 1)[0] + ":42", "class label '42' is not among"),
    ],
)
def test_corrupt_file_names_file_line_and_problem(tmp_path, edit, problem):
    path = _copy_dataset(tmp_path)
    lineno = _corrupt_case(path, edit)
    with pytest.raises(demo.DemoError) as info:
        demo.load_japanese_vowels("train", tmp_path)
    message = str(info.value)
    assert str(path) in message and f"line {lineno}" in message and problem in message


def test_truncated_file(tmp_path):
    path = _copy_dataset(tmp_path)
    path.write_text("@problemName JapaneseVowels\n@dimensions 12\n")
    with pytest.raises(demo.DemoError, match="no '@data' section"):
        demo.load_japanese_vowels("train", tmp_path)


def test_cli_reports_corrupt_file_in_one_line(tmp_path, capsys):
    path = _copy_dataset(tmp_path)
    _corrupt_case(path, lambda line: line.replace("1.860936", "nan?", 1))
    argv = ["--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--quiet"]
    code = demo.main([*argv, "--no-compile-cache"])  # this process's JAX stays as it is
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: corrupt dataset file")
    assert str(path) in err and "Traceback" not in err


@pytest.mark.parametrize("module", ["sktime", "tqdm", "matplotlib.figure", "orbax.checkpoint"])
def test_cli_missing_package_says_what_to_install(monkeypatch, tmp_path, capsys, module):
    # None in sys.modules makes find_spec and import fail, as if it were not installed.
    monkeypatch.setitem(sys.modules, module, None)
    code = demo.main(["--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "pip install -e '.[demo]'" in err and module.split(".")[0] in err
    assert "pip install 'gru-jax[demo] @ git+https://github.com/gru-jax/gru_jax'" in err
    assert not (tmp_path / "out").exists()  # it failed before training


def test_cli_unusable_cache_folder_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    argv = ["--out", str(tmp_path / "out"), "--quiet", "--compile-cache", str(blocker / "c")]
    code = demo.main(argv)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: cannot create the compilation cache folder")
    assert "--no-compile-cache" in err


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--epochs", "--seed", "--hidden", "--out", "--compile-cache"):
        assert option in out


def test_short_run_learns_and_saves(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--epochs", "2", "--hidden", "8", "--seed", "1", "--out", str(out), "--quiet"]
    argv.append("--no-compile-cache")  # JAX's settings in this test process stay as they are
    # optax's Adam computes `decay ** count` with an int32 count, which the suite's strict
    # promotion rejects; the demo runs under JAX's standard promotion anyway.
    with jax.numpy_dtype_promotion("standard"):
        code = demo.main(argv)
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy:" in printed

    config = json.loads((out / "checkpoint.json").read_text())
    loss = config["history"]["loss"]
    assert len(loss) == 2 and loss[1] < loss[0]
    assert config["hidden"] == 8 and config["epochs"] == 2
    png = (out / "learning_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    # The checkpoint restores to a model with the same test accuracy.
    params, norm, restored = demo.restore_checkpoint(out / "checkpoint")
    assert restored == config
    x, lengths, y = demo.load_japanese_vowels("test")
    model = demo.make_model(restored["hidden"])
    logits = jax.jit(model.apply)({"params": params}, demo.normalize(x, lengths, **norm), lengths)
    accuracy = float(np.mean(np.asarray(jax.numpy.argmax(logits, -1)) == y))
    assert accuracy == pytest.approx(config["test_accuracy"], abs=1e-6)
    assert accuracy > 1 / 9  # better than chance after two epochs


def _demo(out, *extra, epochs=12):
    """argv of a short demo run (seed 3, hidden 8) into ``out``."""
    argv = ["--epochs", str(epochs), "--hidden", "8", "--seed", "3", "--out", str(out)]
    return [sys.executable, "-m", "gru_jax.demo", *argv, *extra]


def _finished(proc_out: str) -> tuple[str, str]:
    accuracy = re.search(r"^test accuracy: .*$", proc_out, re.M)
    loss = re.search(r"^final training loss: .*$", proc_out, re.M)
    assert accuracy and loss, proc_out
    return accuracy.group(0), loss.group(0)


def _compiled(proc_out: str) -> tuple[int, int]:
    """``(loaded from the cache, compiled)`` programs of a demo's compile report."""
    report = re.search(r"^compiled in [\d.]+ s \((\d+) of (\d+) programs loaded", proc_out, re.M)
    assert report, proc_out
    return int(report.group(1)), int(report.group(2))


def test_killed_run_resumes_to_the_same_result(tmp_path):
    """A real SIGKILL mid-training, then a rerun: it resumes from the last complete
    checkpoint and prints the same test accuracy and loss as an uninterrupted run.

    The runs share a persistent compilation cache folder, empty at first: the first run
    compiles every program, and the resumed one loads them all from the cache.
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cache = ("--compile-cache", str(tmp_path / "jax_cache"))
    whole = subprocess.run(
        _demo(tmp_path / "whole", *cache), capture_output=True, text=True, env=env, timeout=300
    )
    assert whole.returncode == 0, whole.stderr
    want = _finished(whole.stdout)
    hits, programs = _compiled(whole.stdout)
    assert hits == 0 and programs >= 3  # init, the training epoch, the test accuracy

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _demo(out, "--quiet", *cache), env=env, stderr=subprocess.PIPE, text=True
    )
    state = out / "train_state"
    deadline = time.monotonic() + 240
    try:
        # Kill once two epochs are checkpointed (orbax names a complete step's folder "N").
        while not (state.is_dir() and any(p.name.isdigit() and int(p.name) >= 2
                                          for p in state.iterdir())):  # fmt: skip
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint.json").exists()  # it did not finish

    # A half-written checkpoint of a later epoch (orbax's temporary folder) is never loaded.
    fake = state / "11.orbax-checkpoint-tmp-1"
    fake.mkdir()
    (fake / "garbage").write_text("not a checkpoint")

    resumed = subprocess.run(
        _demo(out, *cache), capture_output=True, text=True, env=env, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    done = int(re.search(r"resuming after epoch (\d+) of 12", resumed.stdout).group(1))
    assert 2 <= done < 11
    assert _finished(resumed.stdout) == want
    assert _compiled(resumed.stdout) == (programs, programs)
    assert not state.exists()  # the finished run keeps its final checkpoint only


def test_finished_run_is_never_overwritten(tmp_path, capsys):
    """A second `make demo` reports the finished run instead of training over it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.json").write_text('{"test_accuracy": 0.5}')
    argv = ["--epochs", "1", "--hidden", "8", "--out", str(out), "--quiet"]
    code = demo.main(argv)
    printed = capsys.readouterr().out
    assert code == 0
    assert "holds a finished run (test accuracy 50.00%" in printed
    # `make demo` cannot pass --force on: the message gives a whole command that can.
    command = printed.split("To train again there: ")[1].split(" (or give --out")[0]
    python, *args = shlex.split(command)
    assert os.path.samefile(python, sys.executable)
    assert args == ["-m", "gru_jax.demo", *argv, "--force"]
    assert (out / "checkpoint.json").read_text() == '{"test_accuracy": 0.5}'
    assert not (out / "train_state").exists()


def test_unfinished_run_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    run = {"hidden": 16, "dropout": 0.0, "epochs": 1, "seed": 0, "data_dir": None}
    (out / "train_state.json").write_text(json.dumps(run))
    code = demo.main(["--epochs", "1", "--hidden", "8", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "hidden: 16 -> 8" in err and "--force" in err
