"""Multi-host data-parallel training of a gru_jax model: run one copy of this script per host.

Every process runs the same program (JAX's multi-controller model). Each one joins the job
with ``jax.distributed.initialize``, loads only its own rows of each global batch, and
hands them to ``jax.make_array_from_process_local_data``; the model, ``train_step``, mesh
and shardings are the single-process recipe's, unchanged. On each of N hosts::

    python train.py --coordinator HOST0:1234 --num-processes N --process-id I --out DIR

Under SLURM or Open MPI, and on a Cloud TPU pod, leave out the first three options:
``jax.distributed.initialize()`` then finds them in the environment. DIR must be a
directory every host sees: each process writes ``DIR/process_<I>.json`` (its losses and
final parameters), and all of them together write one orbax checkpoint, ``DIR/params``.

tests/test_multihost.py runs it as 2 processes x 2 CPU devices on localhost (with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` and ``JAX_PLATFORMS=cpu``; across
processes, JAX's CPU collectives are gloo, the default) and checks the losses, the final
parameters and the checkpoint against a single-process run of the same global batches.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import gru_jax

GLOBAL_BATCH, TIME, FEATURES = 8, 6, 3


class Regressor(nn.Module):
    """A GRU encoder and a linear read-out of the mean over each sequence's valid steps."""

    hidden_size: int = 8

    @nn.compact
    def __call__(self, x, lengths):
        out, _ = gru_jax.GRU(self.hidden_size, bidirectional=True)(x, lengths=lengths)
        # padded outputs are exactly zero, so the valid mean is a sum over time / length
        pooled = out.sum(axis=1) / jnp.maximum(lengths, 1)[:, None].astype(out.dtype)
        return nn.Dense(1)(pooled)[:, 0]


model = Regressor()
optimizer = optax.sgd(0.1, momentum=0.9)


@jax.jit
def train_step(params, opt_state, x, y, lengths):
    def loss_fn(params):
        pred = model.apply({"params": params}, x, lengths)
        return jnp.mean((pred - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def load_rows(step: int, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``rows`` of global batch ``step`` as ``(x, y, lengths)``: a stand-in for a data
    pipeline in which each host reads only its own examples (each row is drawn from its own
    seed, so no process needs the others' rows)."""
    x = np.zeros((len(rows), TIME, FEATURES), np.float32)
    y = np.zeros(len(rows), np.float32)
    lengths = np.zeros(len(rows), np.int32)
    for i, row in enumerate(rows):
        rng = np.random.default_rng([step, row])
        x[i] = rng.standard_normal((TIME, FEATURES))
        y[i] = rng.standard_normal()
        lengths[i] = TIME if row == 0 else rng.integers(1, TIME + 1)
    return x, y, lengths


def process_rows(sharding: NamedSharding, global_batch: int) -> list[int]:
    """The rows of a global batch that this process's devices hold, in order."""
    index = sharding.addressable_devices_indices_map((global_batch,))
    return sorted({row for (s,) in index.values() for row in range(*s.indices(global_batch))})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--coordinator", help="host:port of process 0 (default: detected)")
    parser.add_argument("--num-processes", type=int, help="default: detected")
    parser.add_argument("--process-id", type=int, help="default: detected")
    parser.add_argument("--bind", help="host:port process 0 listens on (default: [::]:port)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)

    # 1. Join the job, before anything else touches JAX's backends. From here on
    # jax.devices() lists every device of every process; jax.local_devices() this one's.
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        coordinator_bind_address=args.bind,
    )

    # 2. The mesh and shardings of the single-process recipe, now over all processes.
    mesh = Mesh(np.array(jax.devices()), axis_names=("data",))
    replicated = NamedSharding(mesh, P())
    batch_sharded = NamedSharding(mesh, P("data"))

    # Parameters and optimizer state: computed by every process, the same (same key), and
    # laid out replicated by jit without any host-to-device transfer.
    @jax.jit
    def init(key):
        x = jnp.zeros((1, TIME, FEATURES), jnp.float32)
        params = model.init(key, x, jnp.ones((1,), jnp.int32))["params"]
        return jax.lax.with_sharding_constraint((params, optimizer.init(params)), replicated)

    params, opt_state = init(jax.random.key(0))

    # 3. Each process loads only its rows of each global batch; the global jax.Array spans
    # every process's devices. train_step is the single-process one: the gradients are
    # all-reduced across processes (gloo between CPUs, NCCL between GPUs, the TPU interconnect).
    rows = process_rows(batch_sharded, GLOBAL_BATCH)
    losses = []
    for step in range(args.steps):
        local_batch = load_rows(step, rows)
        x, y, lengths = jax.make_array_from_process_local_data(batch_sharded, local_batch)
        params, opt_state, loss = train_step(params, opt_state, x, y, lengths)
        losses.append(float(loss))  # the loss is replicated: every process holds a copy
        if jax.process_index() == 0:  # log from one process
            print(f"step {step}: loss {losses[-1]:.6f}", flush=True)

    # 4. Every process calls save on the same path (orbax coordinates them: process 0 writes
    # the metadata, each process its share of the data; one that skips save stalls the rest).
    ckpt = (args.out / "params").resolve()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(ckpt, params)
        ckptr.wait_until_finished()
        # Restoring onto the mesh, as a resumed job would: the target gives the sharding.
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), params
        )
        restored = ckptr.restore(ckpt, abstract)

    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "rows": rows,
        "x_shard_rows": [int(s.data.shape[0]) for s in x.addressable_shards],
        "losses": losses,
        # replicated arrays: np.asarray reads this process's copy
        "params": jax.tree.map(lambda a: np.asarray(a).tolist(), params),
        "restored_equal": all(
            np.array_equal(np.asarray(a), np.asarray(b)) and a.sharding == b.sharding
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored), strict=True)
        ),
    }
    (args.out / f"process_{jax.process_index()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
