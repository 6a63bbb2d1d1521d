"""The single-process run that tests/test_multihost.py compares the multi-process one with.

Runs the data-parallel recipe of docs/many_devices.md (tests/_sharded_step.py: its model, optimizer,
``train_step`` and ``train``, which places each batch with ``jax.device_put``) in one process
on the same global batches as tests/_multihost_worker.py, all rows loaded by this process.
Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the same 4 devices as
2 processes x 2). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from _multihost_worker import GLOBAL_BATCH, load_rows
from _sharded_step import model, optimizer, train


def main(num_steps: int) -> dict:
    batches = [load_rows(step, range(GLOBAL_BATCH)) for step in range(num_steps)]
    x, _, lengths = batches[0]
    params = jax.jit(model.init)(jax.random.key(0), x, lengths)["params"]
    final, _, losses = train(params, optimizer.init(params), batches)
    return {
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "losses": [float(v) for v in losses],
        "initial_params": jax.tree.map(lambda a: np.asarray(a).tolist(), params),
        "params": jax.tree.map(lambda a: np.asarray(a).tolist(), final),
    }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
