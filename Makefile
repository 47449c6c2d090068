# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install bqx into it if needed (re-installing when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint wheel-check bench bench-more clean

# the tests that need no database server: seconds
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m 'not db' -q

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bqx demo $(DEMO_ARGS)
	@echo 'bqx is $(BIN)/bqx; to type plain `bqx`: source $(BIN)/activate'

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff (lint and format) and the type checker (mypy, configured in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# the built wheel, installed without extras into a fresh venv outside the checkout (needs no .venv)
wheel-check:
	PYTHON=$(PYTHON) tools/wheel_check.sh

bench: $(STAMP)
	$(BIN)/python bench/kernel.py
	$(BIN)/python bench/backfill.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/noop.py
	$(BIN)/python bench/ingest.py

# the slower measurements: update latency, export against pandas, Dask scaling
bench-more: $(STAMP)
	$(BIN)/python bench/update.py
	$(BIN)/python bench/export.py
	$(BIN)/python bench/scaling.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build src/*.egg-info
