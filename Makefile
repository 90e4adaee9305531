# Newcomer entry points: `make demo` and `make test` (see README.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv demo test lint diagrams clean

$(BIN)/vhsm: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/vhsm

venv: $(BIN)/vhsm

demo: venv
	$(BIN)/vhsm demo

test: venv
	$(BIN)/python -m pytest -n 2 -q
	$(BIN)/mypy
	$(BIN)/ruff check vhsm tests benchmarks fuzz
	$(BIN)/ruff format --check vhsm tests benchmarks fuzz

lint: venv
	$(BIN)/mypy
	$(BIN)/ruff check vhsm tests benchmarks fuzz

diagrams: venv
	$(BIN)/vhsm diagram --format all --out diagrams
	$(BIN)/vhsm diagram --trace tests/data/qemu72-blk.jsonl --out diagrams

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
