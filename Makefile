# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint worker server clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dunning demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

server: $(STAMP)
	$(BIN)/dunning server

worker: $(STAMP)
	$(BIN)/dunning worker

clean:
	rm -rf $(VENV) .dunning .pytest_cache
