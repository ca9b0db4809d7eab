# Everyday targets. `make demo` and `make test` work on a fresh machine: both bootstrap first.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: bootstrap bootstrap-test demo test test-unit test-integration lint format bench lock clean

bootstrap:
	@scripts/bootstrap.sh

# The tests also need Chromium (Debian's) for the browser test.
bootstrap-test:
	@scripts/bootstrap.sh --test

demo: bootstrap
	@$(BIN)/refgen demo

test: bootstrap-test
	$(BIN)/python -m pytest

test-unit: bootstrap
	$(BIN)/python -m pytest tests/unit

test-integration: bootstrap-test
	$(BIN)/python -m pytest tests/integration

lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: bootstrap
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: bootstrap
	$(BIN)/python -m bench

# Re-pin after changing dependencies in pyproject.toml.
lock: bootstrap
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -e '^refgen' -e '^py-spy' > constraints.txt

clean:
	rm -rf .refgen .pytest_cache .mypy_cache .ruff_cache
