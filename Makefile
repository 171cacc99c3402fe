# Fresh machine: `make demo` or `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PURE := src/libvms/encoding.py src/libvms/keys.py src/libvms/merkle.py src/libvms/checkpoint.py src/libvms/errors.py

.PHONY: setup test lint typecheck pytest demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy --strict $(PURE)
	$(BIN)/mypy src/libvms

pytest: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/python examples/demo.py

bench: $(STAMP)
	for b in ledgers vm audit rpc; do $(BIN)/python benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
