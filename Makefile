# Two entry points for a fresh machine: `make demo` and `make test`.
# Each builds .venv with what it needs and starts its own throwaway servers (README, top).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: venv
	$(PY) -m coordinator race --pods 8 --callers 16 --strategy all

lint: venv
	$(PY) -m ruff check .
	$(PY) -m mypy --strict coordinator
	$(VENV)/bin/lint-imports  # the import contracts in pyproject.toml

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis .import_linter_cache

.PHONY: bench
bench: venv
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m coordinator bench --out docs/bench
