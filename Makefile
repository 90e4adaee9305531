# Newcomer entry points: `make demo`, `make test` and `make docs` (see README.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# One stamp per set of extras installed into the venv (demo: vhsm alone).
DEMO := $(VENV)/.installed-demo
DOCS := $(VENV)/.installed-docs
DEV := $(VENV)/.installed-dev
export NO_MKDOCS_2_WARNING := 1

.PHONY: venv demo test lint docs diagrams clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(DEMO): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(DOCS): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[docs]'
	touch $@ $(DEMO)

$(DEV): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,lint,docs]'
	touch $@ $(DOCS) $(DEMO)

venv: $(DEV)

demo: $(DEMO)
	$(BIN)/vhsm demo

test: venv
	$(BIN)/python -m pytest -n 2 -q
	$(BIN)/mypy
	$(BIN)/ruff check vhsm tests benchmarks fuzz docs/hooks.py
	$(BIN)/ruff format --check vhsm tests benchmarks fuzz docs/hooks.py
	$(BIN)/mkdocs build --strict -q

docs: $(DOCS)
	$(BIN)/mkdocs build --strict

lint: venv
	$(BIN)/mypy
	$(BIN)/ruff check vhsm tests benchmarks fuzz docs/hooks.py

diagrams: venv
	$(BIN)/vhsm diagram --format all --out diagrams
	$(BIN)/vhsm diagram --trace tests/data/qemu72-blk.jsonl --out diagrams

clean:
	rm -rf $(VENV) build dist site .pytest_cache .mypy_cache .ruff_cache
