"""The notebooks are saved with current outputs and open on Colab from their first cell.

Outputs are saved so that GitHub and Colab's preview show them. They must be what the code
gives: scripts/execute_notebooks.py runs a notebook from top to bottom and stamps it with a
hash of its code cells; a notebook whose code changed since is refused here until it is
re-run. (``make test`` also runs every notebook, with nbmake, without saving.)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COLAB = "https://colab.research.google.com/github/gru-jax/gru_jax/blob/main/notebooks/"
RERUN = "re-run `.venv/bin/python scripts/execute_notebooks.py {}` and commit the result"


def _script():
    spec = importlib.util.spec_from_file_location(
        "execute_notebooks", ROOT / "scripts" / "execute_notebooks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute_notebooks = _script()


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4


def test_source_hash_sees_code_only():
    def notebook(code, markdown):
        return {
            "cells": [
                {"cell_type": "markdown", "source": [markdown]},
                {"cell_type": "code", "source": code},
            ]
        }

    base = execute_notebooks.source_hash(notebook(["x = 1\n", "y = 2"], "# a"))
    assert base == execute_notebooks.source_hash(notebook(["x = 1\ny = 2"], "# b"))
    assert base != execute_notebooks.source_hash(notebook(["x = 1\ny = 3"], "# a"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_from_the_current_code(path):
    notebook = _load(path)
    stamp = notebook["metadata"].get(execute_notebooks.METADATA_KEY, {})
    assert stamp.get("source_sha256") == execute_notebooks.source_hash(notebook), (
        f"{path.name}: its code changed since its outputs were saved; "
        + RERUN.format(path.relative_to(ROOT))
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_code_cell_ran_once_in_order_without_error(path):
    cells = _code_cells(_load(path))
    counts = [cell.get("execution_count") for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts}, not one run from top to bottom; "
        + RERUN.format(path.relative_to(ROOT))
    )
    errors = [
        i
        for i, cell in enumerate(cells)
        if any(out.get("output_type") == "error" for out in cell.get("outputs", []))
    ]
    assert not errors, f"{path.name}: code cells {errors} saved an error"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_opens_with_colab_badge_and_install_cell(path):
    cells = _load(path)["cells"]
    first = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown"
    assert "colab-badge.svg" in first and COLAB + path.name in first
    # The install cell: a no-op where gru_jax imports. Elsewhere it installs gru_jax from
    # GitHub without letting pip replace a jax that is there (Colab's matches its GPU or TPU
    # plugin): --no-deps, then the other requirements with jax and jaxlib pinned as
    # installed; a plain install only where there is no jax; a message where jax is too old.
    install = "".join(cells[1]["source"])
    assert cells[1]["cell_type"] == "code"
    assert 'find_spec("gru_jax") is None' in install
    assert "git+https://github.com/gru-jax/gru_jax" in install
    assert 'installed("jax")' in install and "JAX_FLOOR = (0, 10, 1)" in install
    assert '%pip install --quiet --no-deps "{GRU_JAX}"' in install
    assert 'for n in ("jax", "jaxlib")' in install and "{pins}" in install
    plain = install.index('%pip install --quiet "{GRU_JAX}"')
    assert install.rfind("if jax_version is None:", 0, plain) != -1
    assert "gru_jax needs jax >= 0.10.1" in install


def _run_install_cell(source: str, versions: dict[str, str], monkeypatch) -> list[str]:
    """Runs an install cell where gru_jax is missing and ``versions`` are installed; returns
    the pip commands it would run about gru_jax and its requirements (magics recorded, with
    IPython's ``{name}`` expansion, not run)."""
    from IPython.core.inputtransformer2 import TransformerManager

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "gru_jax" else real_find_spec(name, *args, **kwargs)

    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "version", version)
    calls = []
    namespace = {}

    class Shell:
        def run_line_magic(self, magic, line):
            expanded = re.sub(r"\{(\w+)\}", lambda m: str(namespace[m.group(1)]), line)
            calls.append(f"%{magic} {expanded}")

    namespace["get_ipython"] = Shell
    exec(TransformerManager().transform_cell(source), namespace)
    return [c for c in calls if "gru-jax" in c or "flax" in c]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_install_cell_keeps_a_working_jax(path, monkeypatch, capsys):
    install = "".join(_load(path)["cells"][1]["source"])
    url = "@ git+https://github.com/gru-jax/gru_jax"

    # A runtime with a recent enough jax (Colab's): gru_jax without dependencies, then its
    # other requirements with jax and jaxlib pinned where they are.
    calls = _run_install_cell(install, {"jax": "0.10.2", "jaxlib": "0.10.2"}, monkeypatch)
    assert len(calls) == 2, calls
    assert calls[0].startswith("%pip install --quiet --no-deps") and url in calls[0]
    assert "flax>=0.12.6" in calls[1] and calls[1].endswith("jax==0.10.2 jaxlib==0.10.2")

    # No jax at all: a plain install, which brings it.
    calls = _run_install_cell(install, {}, monkeypatch)
    assert len(calls) == 1 and "--no-deps" not in calls[0] and url in calls[0], calls

    # A jax older than the floor: nothing installed, and a message saying what to do.
    capsys.readouterr()
    assert _run_install_cell(install, {"jax": "0.9.2", "jaxlib": "0.9.2"}, monkeypatch) == []
    message = capsys.readouterr().out
    assert "jax 0.9.2" in message and "gru_jax needs jax >= 0.10.1" in message


def test_install_cell_floor_matches_the_requirement():
    """The cell's JAX_FLOOR is pyproject.toml's lower bound for jax."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"jax>=0.10.1"' in pyproject
