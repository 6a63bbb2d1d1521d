"""JAX transformations compose with the GRU: jit, grad, vmap, lax.scan, checkpoint, bf16.

Comparisons between two programs that compute the same float32 numbers in a different
arrangement (jit vs eager, vmapped vs looped, chunked vs whole) use ``rtol = atol = 1e-6``:
XLA may fuse or block the matmuls differently, which moves the last bits of float32
(``eps = 1.2e-7``) but never more than a few units of it for these small problems.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from _reference import random_params

import gru_jax

CLOSE = dict(rtol=1e-6, atol=1e-6)
gru = jax.jit(gru_jax.gru)  # compiled once per shape; eager mode compiles every primitive


def setup(seed=0, *, batch=3, steps=6, in_features=4, hidden=5, num_layers=2, bidirectional=True):
    """NumPy params, ``x`` ``(B, T, D)``, ``h0`` ``(L*K, B, H)`` (NumPy: no eager compiles)."""
    rng = np.random.default_rng(seed)
    params = random_params(
        rng, in_features, hidden, num_layers=num_layers, bidirectional=bidirectional
    )
    x = rng.standard_normal((batch, steps, in_features)).astype(np.float32)
    states = num_layers * (2 if bidirectional else 1)
    h0 = rng.standard_normal((states, batch, hidden)).astype(np.float32)
    return params, x, h0


def assert_trees_close(a, b, **tol):
    tol = tol or CLOSE
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **tol), a, b)


# --------------------------------------------------------------------------------------------
# jit, grad
# --------------------------------------------------------------------------------------------


def test_jit_equals_eager_with_traced_lengths():
    """Eager (lengths concrete, validated) == jit (lengths traced)."""
    params, x, h0 = setup()
    lengths = np.array([6, 3, 0], np.int32)
    eager = gru_jax.gru(params, x, h0, lengths=lengths)
    jitted = gru(params, x, h0, lengths=lengths)
    assert_trees_close(jitted, eager)
    np.testing.assert_array_equal(jitted[0][1, 3:], 0.0)
    np.testing.assert_array_equal(jitted[1][:, 2], h0[:, 2])  # length 0 keeps h0


def test_grad_module_equals_core():
    """``jax.grad`` through the linen module == through the pure core, bit for bit.

    (Gradient values are checked against finite differences in tests/test_grads.py.)
    """
    params, x, h0 = setup(num_layers=1, steps=3, bidirectional=False)
    lengths = np.array([3, 1, 2], np.int32)
    model = gru_jax.GRU(hidden_size=5)
    w = np.random.default_rng(3).standard_normal((3, 3, 5)).astype(np.float32)

    def core_loss(params, x):
        out, h_n = gru_jax.gru(params, x, h0, lengths=lengths)
        return jnp.sum(out * w) + jnp.sum(h_n**2)

    def module_loss(params, x):
        out, h_n = model.apply({"params": params}, x, h0, lengths=lengths)
        return jnp.sum(out * w) + jnp.sum(h_n**2)

    g_core = jax.jit(jax.grad(core_loss, argnums=(0, 1)))(params, x)
    g_module = jax.jit(jax.grad(module_loss, argnums=(0, 1)))(params, x)
    assert_trees_close(g_module, g_core, rtol=0, atol=0)
    assert all(np.any(g != 0) for g in jax.tree.leaves(g_core))


# --------------------------------------------------------------------------------------------
# vmap
# --------------------------------------------------------------------------------------------


def test_vmap_over_extra_batch_axis():
    """``vmap`` over a leading axis of x, h0 and lengths == a Python loop over that axis."""
    params, _, _ = setup()
    parts = [setup(seed) for seed in (1, 2)]
    x = np.stack([p[1] for p in parts])  # (E, B, T, D)
    h0 = np.stack([p[2] for p in parts])  # (E, L*K, B, H)
    lengths = np.array([[6, 2, 0], [1, 6, 4]], np.int32)  # (E, B)

    out, h_n = jax.vmap(lambda x, h0, n: gru_jax.gru(params, x, h0, lengths=n))(x, h0, lengths)
    assert out.shape == (2, 3, 6, 10) and h_n.shape == (2, 4, 3, 5)
    for e in range(2):
        out_e, h_e = gru(params, x[e], h0[e], lengths=lengths[e])
        np.testing.assert_allclose(out[e], out_e, **CLOSE)
        np.testing.assert_allclose(h_n[e], h_e, **CLOSE)


def test_vmap_over_params_is_an_ensemble():
    """``vmap`` over stacked params (an ensemble of GRUs) == each model alone."""
    _, x, h0 = setup()
    lengths = np.array([6, 3, 0], np.int32)
    members = [setup(seed)[0] for seed in (3, 4, 5)]
    ensemble = jax.tree.map(lambda *a: np.stack(a), *members)
    out, h_n = jax.jit(jax.vmap(lambda p: gru_jax.gru(p, x, h0, lengths=lengths)))(ensemble)
    for m in range(3):
        out_m, h_m = gru(members[m], x, h0, lengths=lengths)
        np.testing.assert_allclose(out[m], out_m, **CLOSE)
        np.testing.assert_allclose(h_n[m], h_m, **CLOSE)


# --------------------------------------------------------------------------------------------
# lax.scan of the module inside a bigger model; jax.checkpoint
# --------------------------------------------------------------------------------------------


def test_lax_scan_over_chunks_equals_whole_sequence():
    """A bigger model scans the linen GRU over chunks of a sequence, carrying h_n -> h0.

    Unidirectional GRU state is all the past carries, so the chunked run equals the whole
    sequence at once: outputs, final state, and gradients through the ``lax.scan``.
    """
    model = gru_jax.GRU(hidden_size=5, num_layers=2)
    params, x, _ = setup(steps=12, bidirectional=False)
    variables = {"params": params}  # the module's params tree is the core's tree
    h0 = np.zeros((2, 3, 5), np.float32)

    def chunked(variables, x):
        chunks = jnp.moveaxis(x.reshape(3, 4, 3, 4), 1, 0)  # (chunks, B, T/4, D)

        def step(h, x_chunk):
            out, h_n = model.apply(variables, x_chunk, h)
            return h_n, out

        h_n, outs = jax.lax.scan(step, h0, chunks)
        return jnp.moveaxis(outs, 0, 1).reshape(3, 12, 5), h_n

    def whole(variables, x):
        return model.apply(variables, x, h0)

    assert_trees_close(jax.jit(chunked)(variables, x), jax.jit(whole)(variables, x))

    def loss(fn):
        def f(variables, x):
            out, h_n = fn(variables, x)
            return jnp.sum(jnp.sin(out)) + jnp.sum(h_n**2)

        return jax.jit(jax.grad(f, argnums=(0, 1)))

    grads = loss(chunked)(variables, x), loss(whole)(variables, x)
    assert_trees_close(*grads, rtol=1e-5, atol=1e-6)  # gradients reach ~10: a few ulps


def test_jax_checkpoint_gradients_equal():
    """``jax.checkpoint`` (save nothing, recompute all in the backward) around the GRU."""
    params, x, h0 = setup(num_layers=1, bidirectional=False)
    lengths = np.array([6, 3, 1], np.int32)

    def loss(params, x):
        out, h_n = gru_jax.gru(params, x, h0, lengths=lengths)
        return jnp.sum(jnp.sin(out)) + jnp.sum(h_n**2)

    pol = jax.checkpoint_policies.nothing_saveable
    plain = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    ckpt = jax.jit(jax.value_and_grad(jax.checkpoint(loss, policy=pol), argnums=(0, 1)))(params, x)
    assert_trees_close(ckpt, plain)


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


def test_bf16_compute_close_to_float32_over_1024_steps():
    """``dtype=bfloat16`` over T = 1024 (bidirectional): finite, ``max |bf16 - f32| <= 1e-2``.

    bf16 rounds each matmul input to 8 significant bits (unit roundoff ``2**-9 ~ 2e-3``), so
    a pre-activation is off by ~``2e-3 * |x W|`` (~1e-3 here). The carry, gates and
    accumulation stay float32, and the GRU forgets (``z`` gating, torch-scale ``W_hh``), so the
    error stays at that level instead of growing with T: observed max ~3.2e-3 (first 256 steps
    2.9e-3, last 256 2.9e-3), mean ~3e-4. The bound 1e-2 is ~3x the observed maximum; drift
    over the 1024 steps would exceed it.
    Also checked: the last 256 steps are no worse than 2x the first 256 (no accumulation).
    """
    params, x, _ = setup(batch=4, steps=1024, in_features=8, hidden=32, num_layers=1)
    f = jax.jit(lambda p, x, dt: gru_jax.gru(p, x, dtype=dt), static_argnums=2)
    out32, h32 = f(params, x, None)
    out16, h16 = f(params, x, jnp.bfloat16)
    assert out16.dtype == jnp.float32 and h16.dtype == jnp.float32  # returned in x's dtype
    for o in (out16, h16):
        assert np.all(np.isfinite(np.asarray(o, np.float32)))
    err = np.abs(np.asarray(out16) - np.asarray(out32))
    assert err.max() <= 1e-2 and err.mean() <= 1e-3, (err.max(), err.mean())
    assert err[:, -256:].max() <= 2 * err[:, :256].max() + 1e-3
    assert np.abs(np.asarray(h16) - np.asarray(h32)).max() <= 1e-2
    assert np.any(out16 != out32)  # bf16 was actually used


def test_bf16_under_strict_promotion():
    params, x, _ = setup(num_layers=1, bidirectional=False)
    out, _ = gru_jax.gru(params, x, dtype=jnp.bfloat16)
    assert out.dtype == jnp.float32


def test_float64_under_strict_promotion():
    with jax.enable_x64(True):
        w = {"w_ih": jnp.ones((1, 2, 3), jnp.float64), "w_hh": jnp.ones((1, 1, 3), jnp.float64)}
        out, h_n = gru_jax.gru({"layer_0": w}, jnp.ones((1, 2, 2), jnp.float64))
        assert out.dtype == jnp.float64 and h_n.dtype == jnp.float64


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------

_DETERMINISM_SCRIPT = textwrap.dedent(
    """
    import hashlib

    import jax
    import jax.numpy as jnp
    import numpy as np
    from _reference import random_params

    import gru_jax


    @jax.jit
    def train_step(params, x, lengths, key):
        def loss(params, x):
            out, h_n = gru_jax.gru(params, x, lengths=lengths, dropout=0.3, key=key)
            return jnp.sum(out**2) + jnp.sum(jnp.sin(h_n)), (out, h_n)

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)


    def run():
        rng = np.random.default_rng(0)
        params = random_params(rng, 3, 8, num_layers=2)
        x = rng.standard_normal((4, 20, 3)).astype(np.float32)
        lengths = np.array([20, 11, 1, 0], np.int32)
        result = train_step(params, x, lengths, jax.random.key(2))
        digest = hashlib.sha256()
        for leaf in jax.tree.leaves(result):
            digest.update(np.asarray(leaf).tobytes())
        return digest.hexdigest()
    """
)


def test_bit_identical_across_runs():
    """Same inputs and keys (dropout on): bit-identical loss, outputs, h_n and gradients.

    Checked twice in this process (inputs rebuilt, same compiled program) and once in a fresh
    Python process (everything recompiled from scratch).
    """
    namespace: dict = {}
    exec(_DETERMINISM_SCRIPT, namespace)  # the child process runs the same code
    first = namespace["run"]()
    second = namespace["run"]()
    assert first == second
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([tests_dir, env.get("PYTHONPATH", "")])
    # The child skips conftest.py: give it the suite's matmul precision, which changes the
    # bits on a GPU (TF32 by default there).
    precision = jax.config.jax_default_matmul_precision
    if precision is not None:
        env["JAX_DEFAULT_MATMUL_PRECISION"] = str(precision)
    child = subprocess.run(
        [sys.executable, "-c", _DETERMINISM_SCRIPT + "\nprint(run())"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    assert child.stdout.strip().splitlines()[-1] == first
    assert len(first) == len(hashlib.sha256().hexdigest())
