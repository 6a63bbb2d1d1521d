"""jax.export: a trained GRU exported with symbolic batch and time, for CPU and CUDA in one
artefact, serialized, deserialized in a fresh process and called on new shapes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

import gru_jax

D, H = 5, 6


def trained(model):
    """The model's variables after a few Adam steps on random data (so they are not init)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 7, D)), jnp.float32)
    if not model.batch_first:
        x = jnp.swapaxes(x, 0, 1)
    lengths = jnp.array([7, 3, 5, 1])
    variables = model.init(jax.random.key(0), x)
    tx = optax.adam(1e-2)
    state = tx.init(variables)

    def loss(v):
        out, _ = model.apply(v, x, lengths=lengths)
        return jnp.mean(out**2)

    @jax.jit
    def step(v, s):
        grads = jax.grad(loss)(v)
        updates, s = tx.update(grads, s, v)
        return optax.apply_updates(v, updates), s

    with jax.numpy_dtype_promotion("standard"):  # optax's int32 step count
        for _ in range(3):
            variables, state = step(variables, state)
    return variables


def exported(model, variables, *, with_lengths=True, batch_first=True):
    b, t = export.symbolic_shape("b, t")
    shape = (b, t, D) if batch_first else (t, b, D)
    args = [jax.ShapeDtypeStruct(shape, jnp.float32)]
    if with_lengths:
        args.append(jax.ShapeDtypeStruct((b,), jnp.int32))

    def serve(x, *lengths):
        return model.apply(variables, x, lengths=lengths[0] if lengths else None)

    return export.export(jax.jit(serve), platforms=("cpu", "cuda"))(*args)


@pytest.mark.parametrize(
    "options",
    [
        dict(num_layers=2, bidirectional=True),
        dict(num_layers=2, bidirectional=True, unroll=8),
        dict(num_layers=1, reset_after=False, unroll=4),
        dict(num_layers=3, bidirectional=True, batch_first=False),
    ],
    ids=["bidir-2L", "unroll-8", "reset-before", "time-major-3L"],
)
def test_export_symbolic_batch_and_time_matches_the_model(options):
    model = gru_jax.GRU(H, **options)
    variables = trained(model)
    batch_first = options.get("batch_first", True)
    exp = exported(model, variables, batch_first=batch_first)
    assert exp.platforms == ("cpu", "cuda")
    blob = exp.serialize()
    assert isinstance(blob, bytearray | bytes) and len(blob) > 0
    restored = export.deserialize(blob)
    rng = np.random.default_rng(1)
    for batch, steps in ((3, 11), (1, 2), (6, 4)):
        x = rng.standard_normal((batch, steps, D)).astype(np.float32)
        lengths = rng.integers(0, steps + 1, batch).astype(np.int32)
        lengths[0] = steps
        x_in = x if batch_first else np.swapaxes(x, 0, 1)
        got = restored.call(x_in, lengths)
        want = model.apply(variables, x_in, lengths=lengths)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_exported_artefact_runs_in_a_fresh_process(tmp_path):
    """Only the serialized bytes cross to the new process: no gru_jax needed there."""
    model = gru_jax.GRU(H, num_layers=2, bidirectional=True)
    variables = trained(model)
    (tmp_path / "gru.jaxexport").write_bytes(exported(model, variables).serialize())
    x = np.random.default_rng(2).standard_normal((5, 9, D)).astype(np.float32)
    lengths = np.array([9, 0, 4, 1, 7], np.int32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "lengths.npy", lengths)
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from jax import export

        sys.modules["gru_jax"] = None  # the artefact must not need the library
        exp = export.deserialize(bytearray(open("gru.jaxexport", "rb").read()))
        out, h_n = exp.call(np.load("x.npy"), np.load("lengths.npy"))
        np.save("out.npy", np.asarray(out))
        np.save("h_n.npy", np.asarray(h_n))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    want_out, want_h = model.apply(variables, x, lengths=lengths)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "h_n.npy"), want_h, rtol=1e-6, atol=1e-6)
    assert np.all(np.load(tmp_path / "out.npy")[1] == 0.0)  # length 0: exactly zero


def test_export_without_lengths_and_nnx_module():
    from flax import nnx

    model = gru_jax.nnx.GRU(D, H, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def serve(x):
        return nnx.merge(graphdef, state)(x, deterministic=True)

    b, t = export.symbolic_shape("b, t")
    exp = export.export(jax.jit(serve))(jax.ShapeDtypeStruct((b, t, D), jnp.float32))
    x = np.random.default_rng(3).standard_normal((2, 6, D)).astype(np.float32)
    for a, b_ in zip(export.deserialize(exp.serialize()).call(x), model(x), strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-6, atol=1e-6)


def _dots(fn, platforms, *args) -> int:
    """The number of matmuls in the module of ``fn`` exported for ``platforms``."""
    return (
        export.export(jax.jit(fn), platforms=platforms)(*args)
        .mlir_module()
        .count("stablehlo.dot_general")
    )


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_each_platform_compiles_its_own_loop(impl):
    """``unroll=None`` is chosen for the platform exported for, not for this CPU host: a
    ``cuda`` (``tpu``) export holds the loop of ``unroll=8``, a ``cpu`` one that of
    ``unroll=1``; a ``["cpu", "cuda", "tpu"]`` export holds both branches (the
    accelerators share one) and, called here, equals the direct call (the gradient to
    1e-6)."""
    params = gru_jax.init_gru(jax.random.key(0), D, H, num_layers=2, bidirectional=True)
    x = np.random.default_rng(4).standard_normal((3, 9, D)).astype(np.float32)
    lengths = np.array([9, 4, 0], np.int32)

    def forward(params, x, unroll=None):
        return gru_jax.gru(params, x, lengths=lengths, unroll=unroll, impl=impl)

    def gradient(params, x):
        return jax.grad(lambda p, x: jnp.sum(forward(p, x)[0] ** 2), argnums=(0, 1))(params, x)

    def pinned(unroll):
        return lambda p, x: forward(p, x, unroll)

    for platform, unroll in (("cuda", 8), ("tpu", 8), ("cpu", 1)):
        assert _dots(forward, [platform], params, x) == _dots(pinned(unroll), [platform], params, x)
    cpu, gpu = (_dots(forward, [p], params, x) for p in ("cpu", "cuda"))
    assert cpu != gpu
    assert _dots(forward, ["cpu", "cuda", "tpu"], params, x) >= cpu + gpu  # both loops
    # The forward is the same program; the gradient's branches are fused around the
    # platform switch, which moves its last bit.
    for fn, tol in ((forward, 0.0), (gradient, 1e-6)):
        exported = export.export(jax.jit(fn), platforms=["cpu", "cuda", "tpu"])(params, x)
        restored = export.deserialize(exported.serialize())
        got, want = restored.call(params, x), fn(params, x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
