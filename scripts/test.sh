#!/usr/bin/env bash
# Sets up .venv and runs the lint (rules, complexity, formatting) and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
