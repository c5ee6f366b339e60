# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv on first use.
# .venv is installed from requirements.lock, which pins the whole dependency tree with hashes.
# After changing dependencies in pyproject.toml, run `make lock` and commit both files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# Extra pip-compile flags, e.g. `make lock LOCK_FLAGS=--upgrade` or `LOCK_FLAGS='--upgrade-package ruff'`.
LOCK_FLAGS ?=

.PHONY: demo test lint worker server clean lock

# Install exactly the lock, then the project itself without resolving again (its build backend,
# setuptools, is pinned in the lock too). The offline dry run fails if pyproject.toml asks for
# something the lock does not provide.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	@PYTHONWARNINGS=ignore $(BIN)/pip install --quiet --dry-run --no-index --no-build-isolation -e '.[dev]' \
		|| { echo "$(LOCK) does not satisfy pyproject.toml: run 'make lock'" >&2; exit 1; }
	touch $(STAMP)

# Regenerate the lock from pyproject.toml (runtime + dev extra + build backend), for Python 3.11 on Linux.
# pip-compile keeps existing pins where they still fit; pass LOCK_FLAGS=--upgrade to move them all.
lock:
	@test -x $(BIN)/pip-compile || { $(PYTHON) -m venv $(VENV) && PYTHONWARNINGS=ignore $(BIN)/pip install --quiet \
		"$$(grep -o '^pip-tools==[^ ]*' $(LOCK) 2>/dev/null || echo pip-tools)"; }
	CUSTOM_COMPILE_COMMAND="make lock" PYTHONWARNINGS=ignore $(BIN)/pip-compile --quiet \
		--extra dev --strip-extras --all-build-deps --allow-unsafe --generate-hashes \
		--no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
		$(LOCK_FLAGS) --output-file $(LOCK) pyproject.toml

demo: $(STAMP)
	$(BIN)/dunning demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

server: $(STAMP)
	$(BIN)/dunning server

worker: $(STAMP)
	$(BIN)/dunning worker

clean:
	rm -rf $(VENV) .dunning .pytest_cache
