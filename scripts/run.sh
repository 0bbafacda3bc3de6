#!/usr/bin/env bash
# Run the gateway on the embedded default: SQLite file, in-process limiter, and the engine
# simulator when no GPU is found. Prints the URL to open.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap-venv.sh
export ENVIRONMENT=${ENVIRONMENT:-development}
export DATABASE_URL=${DATABASE_URL:-sqlite+aiosqlite:///./var/gateway.db}
exec .venv/bin/vllm-gateway serve
