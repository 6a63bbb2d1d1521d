"""Executes the notebooks in place and stamps each with the hash of the code it ran.

    .venv/bin/python scripts/execute_notebooks.py                 # every notebook
    .venv/bin/python scripts/execute_notebooks.py notebooks/02_porting_from_pytorch.ipynb

Each notebook runs from top to bottom in a fresh kernel (this Python's ``python3`` kernel),
in the notebooks folder, and is saved with its outputs. Its metadata then records
``gru_jax.source_sha256``, the hash of its code cells' sources (see :func:`source_hash`):
``tests/test_notebooks_clean.py`` fails when a notebook's code no longer matches the hash,
i.e. when its saved outputs may no longer be what its code gives.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
METADATA_KEY = "gru_jax"
TIMEOUT_S = 900


def source_hash(notebook: dict) -> str:
    """SHA-256 of the code cells' sources, in order (markdown cells do not count)."""
    sources = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    return hashlib.sha256(json.dumps(sources).encode("utf-8")).hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("jax", "flax", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def execute(path: Path) -> float:
    """Runs ``path`` in place and stamps it; returns the wall time in seconds."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(
        notebook,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
    )
    client.execute()
    seconds = time.perf_counter() - start
    notebook.metadata[METADATA_KEY] = {
        "source_sha256": source_hash(notebook),
        "executed_with": _versions(),
        "note": "outputs saved by scripts/execute_notebooks.py; re-run it when a code cell changes",
    }
    nbformat.write(notebook, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: all)")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        print(f"{path.name}: executing ...", flush=True)
        print(f"{path.name}: done in {execute(path.resolve()):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
