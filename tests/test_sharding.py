"""Data-parallel training over a 4-device mesh equals the single-device run.

The CPU backend fakes 4 devices with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``,
which only takes effect before JAX initializes, so tests/_sharded_step.py runs in a fresh
process. Tolerances are float32 precision: the sharded loss and gradient are sums of the
same terms in a different order (per-device partial sums, then an all-reduce), so they may
differ in the last bits (loss ``rtol = 1e-6``, i.e. ~8 ulps), and after 3 SGD steps with
learning rate 0.1 the parameters by at most ``1e-6`` absolute while the steps moved them by
more than ``1e-3`` (measured: 3e-8 and 8e-2).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

TESTS = pathlib.Path(__file__).resolve().parent
SCRIPT = TESTS / "_sharded_step.py"
DOC = TESTS.parent / "docs" / "many_devices.md"
BEGIN, END = "# --- recipe: begin ---\n", "# --- recipe: end ---\n"


def recipe() -> str:
    text = SCRIPT.read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip("\n")


def test_data_parallel_step_equals_single_device():
    # CPU even on a GPU machine: the flag fakes devices of the host platform only.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "3"],
        capture_output=True,
        text=True,
        env=env,
        cwd=TESTS,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert result["num_devices"] == 4
    assert result["x_devices"] == 4 and result["x_shard_batch"] == [2, 2, 2, 2]
    assert result["params_replicated"] and result["params_devices"] == 4
    np.testing.assert_allclose(result["losses_mesh"], result["losses_single"], rtol=1e-6)
    assert result["losses_single"][-1] < result["losses_single"][0]  # it trains
    assert result["max_abs_param_diff"] <= 1e-6
    assert result["max_abs_param_update"] >= 1e-3


def test_docs_recipe_is_the_tested_code():
    """docs/many_devices.md quotes the recipe of tests/_sharded_step.py verbatim."""
    assert recipe() in DOC.read_text()
