"""Notebooks are committed clean (no outputs) and open on Colab from their first cell."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
COLAB = "https://colab.research.google.com/github/gru-jax/gru_jax/blob/main/notebooks/"


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_outputs_or_execution_counts(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    dirty = [
        i
        for i, cell in enumerate(cells)
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; strip them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_opens_with_colab_badge_and_install_cell(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    first = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown"
    assert "colab-badge.svg" in first and COLAB + path.name in first
    # The install cell: a no-op where gru_jax imports, a pip install from GitHub elsewhere.
    install = "".join(cells[1]["source"])
    assert cells[1]["cell_type"] == "code"
    assert 'find_spec("gru_jax") is None' in install
    assert "%pip install" in install and "git+https://github.com/gru-jax/gru_jax" in install
