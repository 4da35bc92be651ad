#!/usr/bin/env bash
# Set up a virtual environment with every extra and run the test suite.
# Usage: scripts/test.sh [pytest args...]   (FOVEA_VENV overrides the venv path, default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FOVEA_VENV:-.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
# -ra: the summary lists every skip with its reason.
exec "$venv/bin/python" -m pytest -ra "$@"
