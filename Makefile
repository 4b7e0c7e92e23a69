# One word per task. `make demo` runs the gateway with its demo engine; `make test` runs every check CI runs:
# `make engine-model` (vLLM's venv and the demo model, checked against its recorded hashes), `make check` (lint,
# types, the suite against the simulated engine, the built model's own tests; a few minutes), `make test-engine`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install demo demo-sim test check test-engine engine-model lint typecheck unit fuzz bench lock clean

$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/gateway demo

demo-sim: install
	$(BIN)/gateway demo --sim

lint: install
	$(BIN)/ruff check gateway tests loadtests scripts adapters
	$(BIN)/ruff format --check gateway tests loadtests scripts adapters

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest

test: engine-model check test-engine

check: lint typecheck unit

# The engine's own virtualenv (.venv-engine, vLLM's CPU build here) and the demo model and adapters the recipe
# builds; each step is skipped when already done and unchanged. The build must reproduce the recorded hashes
# (adapters/recipe/weights.json): a file that differs fails here, named, with what to look at.
engine-model: install
	$(BIN)/python -c "from gateway.devtools.engine_runner import ensure_demo_model, ensure_engine_env; ensure_demo_model(ensure_engine_env(), check=True)"

# The tests that start a real vLLM on the demo model.
test-engine: engine-model
	$(BIN)/pytest -m engine -s

# The request fuzz test with many more examples than the suite's 2,000 (tests/test_fuzz.py).
GATEWAY_FUZZ_EXAMPLES ?= 50000
fuzz: install
	GATEWAY_FUZZ_EXAMPLES=$(GATEWAY_FUZZ_EXAMPLES) $(BIN)/pytest tests/test_fuzz.py -q

# `make bench STORE=postgres`: the same measurement with the state and the request log in Postgres.
STORE ?= sqlite
bench: install
	$(BIN)/python loadtests/bench_overhead.py --store $(STORE)

# Refresh the pinned versions after changing dependencies in pyproject.toml.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e' > requirements.lock

clean:
	rm -rf $(VENV) .venv-engine var .pytest_cache .mypy_cache .ruff_cache .hypothesis
