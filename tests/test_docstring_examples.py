"""The ``>>>`` examples of the public docstrings run and print what they show (doctest).

They are shown on the API page of the docs, so, like the README's and the docs' blocks
(tests/test_docs_examples.py), they are executed by the suite.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import gru_jax

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(gru_jax.__path__, "gru_jax.")
    if ">>>" in (importlib.util.find_spec(name).loader.get_source(name) or "")
)


def test_there_are_examples():
    assert {"gru_jax._cell", "gru_jax._stack"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
