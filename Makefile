# Quick start: `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup demo test test-oldest lint format bench clean

# $(call venv,DIR,EXTRA_PIP_ARGS), the recipe of a venv's stamp file: DIR/bin/python with
# this package, editable, and its dev and demo extras.
define venv
	@test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet -e '.[dev,demo]' $(2)
	@touch $@
endef
PYTEST := -m pytest -q -n 2 --nbmake tests notebooks $(PYTEST_ARGS)

$(STAMP): pyproject.toml
	$(call venv,$(VENV),)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m gru_jax.demo

test: $(STAMP)
	$(PY) $(PYTEST)

# The whole suite against the oldest supported versions (pyproject.toml's lower bounds,
# pinned in tests/oldest-deps.txt), in a venv of its own; CI runs it after `make test`.
OLDEST_VENV ?= .venv-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.installed-stamp

$(OLDEST_STAMP): pyproject.toml tests/oldest-deps.txt
	$(call venv,$(OLDEST_VENV),-c tests/oldest-deps.txt)

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python $(PYTEST)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m gru_jax.bench --quick

clean:
	rm -rf $(VENV) $(OLDEST_VENV) runs bench_out .pytest_cache .ruff_cache .hypothesis
