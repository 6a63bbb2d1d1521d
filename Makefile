# Quick start: `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-oldest docs lint format bench clean

# $(call venv,DIR,EXTRAS,EXTRA_PIP_ARGS), the recipe of a venv's stamp file: DIR/bin/python
# with this package, editable, and the given extras (a variable: its commas stay one word).
# The install is quiet twice over (errors only): once, pip still shows setuptools' notice
# about editable installs, which is about setuptools, not this package.
define venv
	@test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet --quiet -e '.[$(2)]' $(3)
	@touch $@
endef
PYTEST := -m pytest -q -n 2 --nbmake tests notebooks $(PYTEST_ARGS)

# One stamp per set of extras: `make demo` installs only what the demo needs (no torch),
# `make test` the test tools too, `make docs` Sphinx.
DEMO_EXTRAS := demo
TEST_EXTRAS := dev,demo
DOCS_EXTRAS := docs
DEMO_STAMP := $(VENV)/.demo-stamp
STAMP := $(VENV)/.installed-stamp
DOCS_STAMP := $(VENV)/.docs-stamp

$(DEMO_STAMP): pyproject.toml
	$(call venv,$(VENV),$(DEMO_EXTRAS),)

$(STAMP): pyproject.toml
	$(call venv,$(VENV),$(TEST_EXTRAS),)

$(DOCS_STAMP): pyproject.toml
	$(call venv,$(VENV),$(DOCS_EXTRAS),)

setup: $(STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m gru_jax.demo

test: $(STAMP)
	$(PY) $(PYTEST)

# The whole suite against the oldest supported versions (pyproject.toml's lower bounds,
# pinned in tests/oldest-deps.txt), in a venv of its own; CI runs it after `make test`.
OLDEST_VENV ?= .venv-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.installed-stamp

$(OLDEST_STAMP): pyproject.toml tests/oldest-deps.txt
	$(call venv,$(OLDEST_VENV),$(TEST_EXTRAS),-c tests/oldest-deps.txt)

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python $(PYTEST)

# The docs site (Sphinx), warnings as errors: docs/_build/html/index.html.
docs: $(DOCS_STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m gru_jax.bench --quick

clean:
	rm -rf $(VENV) $(OLDEST_VENV) runs bench_out docs/_build .pytest_cache .ruff_cache .hypothesis
