"""Eager calls compile once: a second call of the same configuration and shapes compiles and
traces nothing, for the pure ``gru``, the linen ``GRU.apply`` and the NNX ``GRU.__call__``."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gru_jax
from gru_jax import nnx as gnnx

_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration")


@contextlib.contextmanager
def count_compilations():
    """Counts XLA compilations and jaxpr traces in the block: ``{"compile": n, "trace": m}``."""
    counts = {"compile": 0, "trace": 0}

    def listener(event, duration, **kwargs):
        if event == _EVENTS[0]:
            counts["compile"] += 1
        elif event == _EVENTS[1]:
            counts["trace"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def quick_start_inputs():
    x = jax.random.normal(jax.random.key(1), (8, 20, 12))
    lengths = jnp.array([20, 17, 9, 20, 3, 11, 20, 5])
    return x, lengths


def test_counter_sees_a_compilation():
    """The counter itself works: a new jitted function compiles once, then never again."""
    f = jax.jit(lambda a: a * 3.0 + 1.0)
    a = np.ones(7, np.float32)
    with count_compilations() as first:
        f(a)
    with count_compilations() as second:
        f(a)
    assert first["compile"] == 1 and first["trace"] >= 1
    assert second == {"compile": 0, "trace": 0}


def test_linen_apply_second_eager_call_compiles_nothing():
    model = gru_jax.GRU(64, num_layers=2, bidirectional=True, dropout=0.1)
    x, lengths = quick_start_inputs()
    variables = model.init(jax.random.key(0), x)
    for deterministic in (True, False):
        rngs = {"dropout": jax.random.key(3)}
        kwargs = dict(lengths=lengths, deterministic=deterministic, rngs=rngs)
        first = model.apply(variables, x, **kwargs)
        with count_compilations() as counts:
            second = model.apply(variables, x, **kwargs)
        assert counts == {"compile": 0, "trace": 0}, (deterministic, counts)
        for a, b in zip(first, second, strict=True):
            np.testing.assert_array_equal(a, b)
    # A new shape compiles anew, once.
    with count_compilations() as counts:
        model.apply(variables, x[:4], lengths=lengths[:4], deterministic=True)
    assert counts["compile"] >= 1


def test_nnx_call_second_eager_call_compiles_nothing():
    model = gnnx.GRU(12, 64, num_layers=2, bidirectional=True, dropout=0.1, rngs=nnx.Rngs(0))
    x, lengths = quick_start_inputs()
    for deterministic in (True, False):
        model(x, lengths=lengths, deterministic=deterministic)
        with count_compilations() as counts:
            model(x, lengths=lengths, deterministic=deterministic)
        assert counts == {"compile": 0, "trace": 0}, (deterministic, counts)


def test_pure_gru_second_eager_call_compiles_nothing_and_matches_jit():
    params = gru_jax.init_gru(jax.random.key(0), 12, 16, num_layers=3, bidirectional=True)
    x, lengths = quick_start_inputs()
    key = jax.random.key(5)
    eager = gru_jax.gru(params, x, lengths=lengths, dropout=0.2, key=key)
    with count_compilations() as counts:
        again = gru_jax.gru(params, x, lengths=lengths, dropout=0.2, key=key)
    assert counts == {"compile": 0, "trace": 0}
    jitted = jax.jit(lambda p, x, n, k: gru_jax.gru(p, x, lengths=n, dropout=0.2, key=k))(
        params, x, lengths, key
    )
    for a, b, c in zip(eager, again, jitted, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)
