"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one file run in order, concatenated into one script, in a fresh Python process
whose working directory is an empty temporary directory: a later block may use the names of
an earlier one, as a reader following the page would. Code that is not meant to run goes in
another fence (```text, ```bash).

A page sets its process's environment with an HTML comment before its first block, one
variable per comment, e.g. ``<!-- docs-test: env KERAS_BACKEND=jax -->``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A fence opens at the start of a line with ``` and a language, and closes with ``` alone.
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_ENV = re.compile(r"<!--\s*docs-test:\s*env\s+([A-Za-z_][A-Za-z0-9_]*)=(\S*)\s*-->")
TIMEOUT_S = 300


def python_blocks(text: str) -> list[str]:
    """The code of each ```python block, in order."""
    return [match.group(1) for match in _BLOCK.finditer(text)]


def page_env(text: str) -> dict[str, str]:
    """The ``docs-test: env`` settings of a page."""
    return dict(_ENV.findall(text))


def script_of(path: Path, blocks: list[str]) -> str:
    """One script of all blocks, each preceded by a comment naming its page and number."""
    name = path.relative_to(ROOT)
    return "\n".join(f"# --- {name}, python block {i + 1}\n{code}" for i, code in enumerate(blocks))


def test_extraction():
    text = (
        "<!-- docs-test: env XLA_FLAGS=--xla_force_host_platform_device_count=4 -->\n"
        "```python\na = 1\n```\n\n```text\nnot = run\n```\n"
        "````markdown\n```python\nb = a + 1\n```\n````\n"
    )
    assert python_blocks(text) == ["a = 1\n", "b = a + 1\n"]
    assert page_env(text) == {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p.read_text(encoding="utf-8"))]


def test_readme_has_examples():
    assert ROOT / "README.md" in PAGES_WITH_CODE


@pytest.mark.parametrize("path", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, tmp_path):
    text = path.read_text(encoding="utf-8")
    script = tmp_path / "blocks.py"
    script.write_text(script_of(path, python_blocks(text)), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **page_env(text)}
    env.setdefault("JAX_PLATFORMS", "cpu")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    child = subprocess.run(
        [sys.executable, str(script)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert child.returncode == 0, (
        f"{path.relative_to(ROOT)}: its python blocks failed (script {script}):\n"
        f"{child.stderr[-4000:]}"
    )
