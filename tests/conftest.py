"""Strict numerics for the whole suite: no silent dtype or rank promotion."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import pytest

# Exact float32 matmuls on every backend. On a GPU, JAX's default precision rounds float32
# matmul operands to TF32 (gru_jax's outputs then differ from exact float32 by 2e-4..6e-4
# on an H100, as torch's cuDNN GRU does with its default allow_tf32), which the suite's
# float32 tolerances against torch on the CPU and the float64 references would reject. It
# changes nothing on the CPU.
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
