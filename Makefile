# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install bqx into it if needed (re-installing when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint dist wheel-check bench bench-more clean

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

# ruff (lint and format), the type checker (mypy, configured in pyproject.toml), and the CI
# workflows: against GitHub's schema (bundled with check-jsonschema) and audited by zizmor, both
# offline
lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(BIN)/zizmor --offline --quiet .github/workflows

# the sdist, then the wheel built from it (so the sdist is known to be complete), both checked
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

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
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build dist src/*.egg-info
