"""Multi-process (multi-host) data-parallel training equals the single-process run.

tests/_multihost_worker.py is started twice on localhost, as processes 0 and 1 of a
``jax.distributed`` job with 2 CPU devices each (``XLA_FLAGS`` set before JAX starts, hence
subprocesses; the CPU collectives across processes are gloo, JAX's default, with no flags).
Each feeds only its own half of every global batch through
``jax.make_array_from_process_local_data`` and trains the data-parallel recipe of
docs/many_devices.md for 3 steps; both save the final parameters as one orbax checkpoint.
tests/_multihost_reference.py runs the recipe itself (``jax.device_put`` of whole batches) in
one process with 4 devices, on the same global batches, at the same time.

Tolerances: not bitwise. The gradients and the mean loss are all-reduced across processes by
gloo and within one process by XLA's CPU all-reduce, which add the per-device partial sums in
different orders, so the results may differ in the last bits (measured: the first loss by
1 ulp, the parameters after 3 steps by 3e-8 while the steps moved them by 8e-2). Hence loss
``rtol = 1e-6`` (~8 ulps) and parameters ``1e-6`` absolute, as tests/test_sharding.py.
Between the two workers, and between the checkpoint and the trained parameters, the
comparison is exact.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from _multihost_worker import GLOBAL_BATCH
from test_sharding import recipe

import gru_jax.checkpoint

TESTS = pathlib.Path(__file__).resolve().parent
WORKER = TESTS / "_multihost_worker.py"
REFERENCE = TESTS / "_multihost_reference.py"
DOC = TESTS.parent / "docs" / "many_devices.md"
NUM_PROCESSES, LOCAL_DEVICES, STEPS = 2, 2, 3
TIMEOUT_S = 240  # for all three processes together; ~15 s on 2 idle cores


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(num_devices: int) -> dict[str, str]:
    # CPU even on a GPU machine; no cluster variables that jax.distributed would auto-detect.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "JAX_COORDINATOR"))
    }
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run_all(commands: dict[str, tuple[list[str], dict]], tmp: pathlib.Path):
    """Runs the commands at once and waits for all of them, up to TIMEOUT_S. Output goes to
    files (no pipe can fill up and stall a process that another one waits for in a
    collective). As soon as one fails, or at the deadline, or on any error here, the others
    are killed (a worker whose peer died would wait for it for minutes).
    Returns ({name: (returncode, stdout, stderr)}, timed_out)."""
    procs, files = {}, {}
    try:
        for name, (cmd, env) in commands.items():
            out, err = open(tmp / f"{name}.out", "w"), open(tmp / f"{name}.err", "w")
            files[name] = (out, err)
            procs[name] = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=TESTS)
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in procs.values()]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.1)
        running = [proc.poll() is None for proc in procs.values()]
        timed_out = any(running) and time.monotonic() >= deadline
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for out, err in files.values():
            out.close()
            err.close()
    return {
        name: (
            proc.returncode,
            (tmp / f"{name}.out").read_text(),
            (tmp / f"{name}.err").read_text(),
        )
        for name, proc in procs.items()
    }, timed_out


def _leaves(tree) -> list[np.ndarray]:
    """A JSON tree of nested lists -> its float32 arrays, in jax.tree order."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, list))
    return [np.asarray(v, np.float32) for v in leaves]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    address = f"127.0.0.1:{_free_port()}"
    commands = {
        f"process_{i}": (
            [
                *(sys.executable, str(WORKER), "--coordinator", address, "--bind", address),
                *("--num-processes", str(NUM_PROCESSES), "--process-id", str(i)),
                *("--steps", str(STEPS), "--out", str(tmp)),
            ],
            _env(LOCAL_DEVICES),
        )
        for i in range(NUM_PROCESSES)
    }
    commands["reference"] = (
        [sys.executable, str(REFERENCE), str(STEPS)],
        _env(NUM_PROCESSES * LOCAL_DEVICES),
    )
    start = time.monotonic()
    done, timed_out = _run_all(commands, tmp)
    wall = time.monotonic() - start
    report = f"not all done after {TIMEOUT_S} s\n" if timed_out else ""
    report += "\n".join(
        f"--- {name}: exit code {rc} (negative: killed by that signal), stderr: ---\n{err[-3000:]}"
        for name, (rc, _, err) in done.items()
    )
    assert not timed_out and all(rc == 0 for rc, _, _ in done.values()), report
    print(f"multi-host job and reference: {wall:.1f} s")
    workers = [json.loads((tmp / f"process_{i}.json").read_text()) for i in range(NUM_PROCESSES)]
    reference = json.loads(done["reference"][1].strip().splitlines()[-1])
    return {"workers": workers, "reference": reference, "dir": tmp, "wall_s": wall}


def test_each_process_feeds_its_own_rows(runs):
    half = GLOBAL_BATCH // NUM_PROCESSES
    for i, w in enumerate(runs["workers"]):
        assert w["process_index"] == i and w["process_count"] == NUM_PROCESSES
        assert w["device_count"] == NUM_PROCESSES * LOCAL_DEVICES
        assert w["local_device_count"] == LOCAL_DEVICES
        assert w["rows"] == list(range(i * half, (i + 1) * half))
        assert w["x_shard_rows"] == [half // LOCAL_DEVICES] * LOCAL_DEVICES
    ref = runs["reference"]
    assert ref["process_count"] == 1 and ref["device_count"] == NUM_PROCESSES * LOCAL_DEVICES


def test_multi_process_training_equals_single_process(runs):
    w0, w1 = runs["workers"]
    ref = runs["reference"]
    # The processes hold the same replicated loss and parameters, bit for bit.
    assert w0["losses"] == w1["losses"]
    for a, b in zip(_leaves(w0["params"]), _leaves(w1["params"]), strict=True):
        np.testing.assert_array_equal(a, b)

    assert len(w0["losses"]) == len(ref["losses"]) == STEPS
    np.testing.assert_allclose(w0["losses"], ref["losses"], rtol=1e-6)
    got, want, start = _leaves(w0["params"]), _leaves(ref["params"]), _leaves(ref["initial_params"])
    assert [a.shape for a in got] == [a.shape for a in want]
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(got, want, strict=True)) <= 1e-6
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(want, start, strict=True)) >= 1e-3


def test_checkpoint_from_every_process_restores_the_final_params(runs):
    # Restored onto the mesh by the job itself (replicated, as a resumed run would) ...
    assert all(w["restored_equal"] for w in runs["workers"])
    # ... and here, in one process with other devices, by gru_jax.checkpoint.restore.
    path = runs["dir"] / "params"
    assert sorted(p.name for p in path.glob("ocdbt.process_*")) == [
        f"ocdbt.process_{i}" for i in range(NUM_PROCESSES)
    ]
    restored = jax.tree.map(np.asarray, gru_jax.checkpoint.restore(path))
    final = _leaves(runs["workers"][0]["params"])
    leaves = jax.tree.leaves(restored)
    assert len(leaves) == len(final)
    for a, b in zip(leaves, final, strict=True):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_worker_trains_the_readme_recipe():
    """The worker's model, optimizer and train_step are the docs recipe's, verbatim."""
    text = recipe()
    part = text[text.index("class Regressor") : text.index("# One mesh axis")].strip()
    assert part in WORKER.read_text()


def test_docs_show_the_tested_code():
    doc = DOC.read_text()
    assert recipe() in doc  # the single-process recipe
    assert "```{literalinclude} ../tests/_multihost_worker.py" in doc
