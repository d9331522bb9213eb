# Two commands on a fresh machine (see README): `make quickstart` and `make test`.
# Both create .venv, install torch==2.13.0 (the CPU wheel) first so no CUDA build is pulled,
# then the project with its dev extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sepnet-installed
PYTEST_ARGS ?=

.PHONY: setup test quickstart lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest $(PYTEST_ARGS)

quickstart: $(STAMP)
	$(BIN)/sepnet cv configs/quickstart.yaml

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) studies build *.egg-info
