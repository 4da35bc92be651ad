#!/usr/bin/env bash
# Run the fast tests (-m "not slow") on another Python version, in a venv of its own.
# Usage: scripts/test_python.sh 3.10 [pytest args...]   (FOVEA_VENV overrides the venv, default .venv-py3.10)
# The interpreter is python3.10 on PATH or pyenv's 3.10.x; when there is none, it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:?usage: scripts/test_python.sh VERSION [pytest args...]}"
shift
pyenv_root="$(pyenv root 2>/dev/null || echo /nonexistent)"
python=""
# A pyenv shim is on PATH even when its version is not selected, so each candidate must run.
for candidate in "python$version" "$pyenv_root"/versions/"$version".*/bin/"python$version"; do
  if "$candidate" -c "import sys; sys.exit(f'{sys.version_info[0]}.{sys.version_info[1]}' != '$version')" \
    >/dev/null 2>&1; then
    python="$candidate"
    break
  fi
done
if [ -z "$python" ]; then
  echo "scripts/test_python.sh: no python$version here (PATH or pyenv): the fast tests did not run on $version"
  exit 0
fi
echo "scripts/test_python.sh: the fast tests on $("$python" -V 2>&1) ($python)"
PYTHON="$python" FOVEA_VENV="${FOVEA_VENV:-.venv-py$version}" exec scripts/test.sh -m "not slow" "$@"
