.PHONY: run test lint types bench clean

## Run the gateway on the embedded default (SQLite, simulator engine when no GPU) and print its URL.
run:
	bash scripts/run.sh

## Install everything missing, then ruff, mypy --strict and the whole test suite.
test:
	bash scripts/test.sh

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

types:
	.venv/bin/mypy

clean:
	rm -rf .venv var .mypy_cache .ruff_cache .pytest_cache test-artifacts
