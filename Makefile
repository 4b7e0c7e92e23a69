# One word per task. `make demo` runs the gateway with its demo engine; `make test` runs every check CI runs.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install demo test test-engine lint typecheck unit bench lock clean

$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/gateway demo

lint: install
	$(BIN)/ruff check gateway tests loadtests scripts adapters
	$(BIN)/ruff format --check gateway tests loadtests scripts adapters

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest

test: lint typecheck unit

# The tests that start a real vLLM (CPU build): installs the engine's own virtualenv (.venv-engine) first.
test-engine: install
	$(BIN)/python -c "from gateway.engine_runner import ensure_engine_env; ensure_engine_env()"
	$(BIN)/pytest -m engine

bench: install
	$(BIN)/python loadtests/bench_overhead.py

# Refresh the pinned versions after changing dependencies in pyproject.toml.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e' > requirements.lock

clean:
	rm -rf $(VENV) .venv-engine var .pytest_cache .mypy_cache .ruff_cache .hypothesis
