"""Data-parallel training of a gru_jax model over a device mesh, checked against one device.

Run by tests/test_sharding.py in a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the flag must be set before JAX
initializes its CPU backend, hence the subprocess). Prints one JSON line with the results.

The part between the ``recipe`` markers is quoted verbatim in docs/many_devices.md (the test
checks that it is); it uses only ``jax.devices()``, so it runs unchanged on a host with
several GPUs or TPU chips.
"""

from __future__ import annotations

import json
import sys

# --- recipe: begin ---
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import gru_jax


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


# One mesh axis over every device; the batch axis is split along it, parameters and
# optimizer state are replicated. jit partitions train_step from these input shardings
# (gradients are all-reduced across devices by XLA). The global batch size must be a
# multiple of the number of devices.
mesh = Mesh(np.array(jax.devices()), axis_names=("data",))
replicated = NamedSharding(mesh, P())
batch_sharded = NamedSharding(mesh, P("data"))


def train(params, opt_state, batches):
    """Data-parallel training over host batches ``(x, y, lengths)`` (NumPy arrays)."""
    params, opt_state = jax.device_put((params, opt_state), replicated)
    losses = []
    for batch in batches:
        x, y, lengths = jax.device_put(batch, batch_sharded)
        params, opt_state, loss = train_step(params, opt_state, x, y, lengths)
        losses.append(loss)
    return params, opt_state, losses


# Usage:
#   params = model.init(jax.random.key(0), x, lengths)["params"]
#   params, opt_state, losses = train(params, optimizer.init(params), batches)
# --- recipe: end ---


def make_data(batch: int, steps: int = 12, features: int = 3):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, steps, features)).astype(np.float32)
    lengths = rng.integers(1, steps + 1, batch).astype(np.int32)
    lengths[0] = steps
    y = rng.standard_normal(batch).astype(np.float32)
    return x, y, lengths


def main(num_steps: int = 3) -> dict:
    num_devices = jax.device_count()
    x, y, lengths = make_data(batch=2 * num_devices)
    params = jax.jit(model.init)(jax.random.key(0), x, lengths)["params"]
    opt_state = optimizer.init(params)

    # Single device: the same train_step on unsharded arrays.
    p1, s1 = params, opt_state
    losses_single = []
    for _ in range(num_steps):
        p1, s1, loss = train_step(p1, s1, x, y, lengths)
        losses_single.append(float(loss))

    # Every device: the recipe.
    pn, _, losses = train(params, opt_state, [(x, y, lengths)] * num_steps)
    losses_mesh = [float(v) for v in losses]
    xs = jax.device_put(x, batch_sharded)

    leaves_1, leaves_n = jax.tree.leaves(p1), jax.tree.leaves(pn)
    start = jax.tree.leaves(params)
    return {
        "num_devices": num_devices,
        "platform": jax.devices()[0].platform,
        "x_devices": len(xs.sharding.device_set),
        "x_shard_batch": [s.data.shape[0] for s in xs.addressable_shards],
        "params_replicated": all(a.sharding.is_fully_replicated for a in leaves_n),
        "params_devices": min(len(a.sharding.device_set) for a in leaves_n),
        "losses_single": losses_single,
        "losses_mesh": losses_mesh,
        "max_abs_param_diff": max(
            float(np.max(np.abs(a - b))) for a, b in zip(leaves_1, leaves_n, strict=True)
        ),
        "max_abs_param_update": max(
            float(np.max(np.abs(a - b))) for a, b in zip(leaves_1, start, strict=True)
        ),
        "max_rel_param_diff": max(
            float(np.max(np.abs(a - b) / (np.abs(a) + 1e-6)))
            for a, b in zip(leaves_1, leaves_n, strict=True)
        ),
    }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
