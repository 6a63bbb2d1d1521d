"""JAX's persistent compilation cache: the demo's helper makes a second process load what the
first compiled, and importing gru_jax changes none of JAX's settings.

Each check runs in fresh processes (the cache is per process, and the settings global), with
``JAX_COMPILATION_CACHE_DIR`` removed from their environment. Cache hits are counted from
JAX's own ``jax.monitoring`` events, never from timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A tiny training step through the demo's helper; prints the cache events it saw.
_STEP = """
import json, sys

import jax
import jax.numpy as jnp

import gru_jax
from gru_jax.demo import enable_compilation_cache

enable_compilation_cache(sys.argv[1])
events = []
jax.monitoring.register_event_listener(lambda event, **kwargs: events.append(event))
model = gru_jax.GRU(hidden_size=4, num_layers=2, bidirectional=True)
x = jnp.ones((2, 5, 3))
variables = jax.jit(model.init)(jax.random.key(0), x)
loss = lambda v: jnp.mean(model.apply(v, x, lengths=jnp.array([5, 2]))[0] ** 2)
jax.block_until_ready(jax.jit(jax.grad(loss))(variables))
print(json.dumps({
    "hits": events.count("/jax/compilation_cache/cache_hits"),
    "misses": events.count("/jax/compilation_cache/cache_misses"),
}))
"""

# Imports gru_jax and the modules users may import, after jax and the dependencies (Pallas's
# modules too: on some jax versions they define flags of their own when first imported),
# and prints the JAX settings that changed (there must be none).
_IMPORT = """
import json, sys

import flax, jax, numpy, optax
from jax.experimental import pallas
from jax.experimental.pallas import tpu, triton

before = dict(jax.config.values)
import gru_jax

helper_loaded = "gru_jax._compile_cache" in sys.modules
import gru_jax.bench, gru_jax.checkpoint, gru_jax.demo, gru_jax.interop, gru_jax.nnx

after = dict(jax.config.values)
print(json.dumps({
    "changed": sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)),
    "cache_dir": jax.config.jax_compilation_cache_dir,
    "helper_loaded_by_import_gru_jax": helper_loaded,
}))
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run(code: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_loads_what_the_first_compiled(tmp_path):
    cache = tmp_path / "jax_cache"
    first = _run(_STEP, str(cache))
    assert first["hits"] == 0 and first["misses"] > 0
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) >= first["misses"]  # one entry per program compiled
    second = _run(_STEP, str(cache))
    assert second == {"hits": first["misses"], "misses": 0}, (first, second)
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing new to write


def test_importing_gru_jax_leaves_jax_settings_alone():
    found = _run(_IMPORT)
    assert found["changed"] == [], found
    assert found["cache_dir"] is None
    assert not found["helper_loaded_by_import_gru_jax"]
