#!/usr/bin/env bash
# Creates .venv (if missing) with torch (CPU, pinned) and the pinned test requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first and pinned, in the same command as what depends on it: an unpinned torch pulls a CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 -r requirements-test.txt
# open_clip only as an independent reference in the tests; its declared dependencies would pull
# torchvision and a CUDA torch, and the tests need none of them.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps open-clip-torch==3.3.0
