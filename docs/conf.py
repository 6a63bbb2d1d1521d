"""Sphinx configuration of the gru_jax docs site (``make docs``).

The notebooks live in ../notebooks, outside this source directory, which Sphinx cannot read
from. Each build copies them into ``_build/notebooks`` (ignored by git, like the rest of
``_build``), and myst-nb renders the copies with the outputs saved in them: nothing is
executed here (``nb_execution_mode = "off"``).
"""

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import gru_jax  # noqa: E402

project = "gru_jax"
author = "The gru_jax authors"
copyright = "The gru_jax authors"
release = gru_jax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.githubpages",  # .nojekyll: GitHub Pages would drop the _-prefixed folders
]

# The notebooks, copied for this build only (see the module docstring).
NOTEBOOK_COPIES = DOCS / "_build" / "notebooks"
shutil.rmtree(NOTEBOOK_COPIES, ignore_errors=True)
NOTEBOOK_COPIES.mkdir(parents=True)
for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy2(notebook, NOTEBOOK_COPIES / notebook.name)

# Everything under _build is output, except the notebook copies.
exclude_patterns = [
    "_build/html",
    "_build/doctrees",
    "_build/jupyter_execute",
    "_build/.jupyter_cache",
    "**/.ipynb_checkpoints",
]

nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

html_theme = "sphinx_book_theme"
html_title = "gru_jax"
html_theme_options = {
    "repository_url": "https://github.com/gru-jax/gru_jax",
    "use_repository_button": True,
    "show_toc_level": 2,
}
