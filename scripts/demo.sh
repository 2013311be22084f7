#!/usr/bin/env bash
# Sets up .venv, builds small built-in models and runs the example workflow end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python cli.py demo "$@"
