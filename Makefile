# The README's two commands: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?= -m "not slow"

.PHONY: demo demo-quick test test-all lint docs install clean clients test-clients bench-clients

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mecs demo --out $(DEMO_OUT)

demo-quick: $(STAMP)
	$(BIN)/mecs demo --quick --out runs/demo-quick

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/mkdocs build --strict --site-dir $(VENV)/site
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest

# the C and Fortran clients and the Fortran example: build/prefix (installed), build/fortran-l96
clients:
	bash clients/build.sh build

test-clients: $(STAMP) clients
	$(BIN)/python -m pytest tests/test_clients.py

bench-clients: $(STAMP) clients
	$(BIN)/python bench/clients.py --probe build/prefix/bin/mecs-probe

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs site .pytest_cache
