#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what is missing (apt packages, .venv, the
# vLLM CPU build and a tiny local model, the llama.cpp CPU build and a tiny GGUF, the official
# Node SDKs, all cached outside the repo), then lint, types and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

bash scripts/bootstrap-system.sh
bash scripts/bootstrap-venv.sh
bash scripts/bootstrap-vllm.sh
# The llama.cpp CPU build and the tiny GGUF (converted from bootstrap-vllm's tiny Llama); the
# llama_cpp_install fixture reads both paths (tests/helpers/llama_cpp_engine.py).
llama_cpp=$(bash scripts/bootstrap-llama-cpp.sh)
VCG_LLAMA_CPP_PYTHON=$(sed -n 's/^LLAMA_CPP_PYTHON=//p' <<<"$llama_cpp")
VCG_TINY_GGUF=$(sed -n 's/^TINY_GGUF=//p' <<<"$llama_cpp")
export VCG_LLAMA_CPP_PYTHON VCG_TINY_GGUF
# The tests' node_clients fixture runs the npm SDKs from here (tests/helpers/node_clients.py).
VCG_NODE_CLIENTS=$(bash scripts/bootstrap-node-clients.sh)
export VCG_NODE_CLIENTS

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict"
.venv/bin/mypy
echo "== import contracts (layers point down)"
.venv/bin/lint-imports --no-cache
echo "== pytest"
# Every real-service fixture must start here: a missing service fails instead of skipping.
export VCG_REQUIRE_ALL=1
set +e
.venv/bin/python -m pytest -p no:cacheprovider -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  rc=1
fi
echo "test command finished in $(( $(date +%s) - started ))s with exit code $rc"
exit "$rc"
