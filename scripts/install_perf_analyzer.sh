#!/usr/bin/env bash
# Install Triton's perf_analyzer (bundled in the tritonclient 2.41.0 wheel) into its own venv.
#
# Usage: scripts/install_perf_analyzer.sh [VENV]   (default .venv-perf)
# Then:  FOVEA_PERF_ANALYZER=VENV/bin/perf_analyzer-env tests/test_perf_analyzer.py runs it.
#
# The binary needs Debian's libb64-0d (apt-get install libb64-0d) and libcudart.so.12, which the
# nvidia-cuda-runtime-cu12 wheel provides even on a machine without a GPU. VENV/bin/perf_analyzer-env
# runs it with that library on LD_LIBRARY_PATH. A venv of its own keeps tritonclient[all]'s extras
# (gevent, cuda-python) out of the test venv.
set -euo pipefail
venv="${1:-.venv-perf}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "tritonclient==2.41.0" "nvidia-cuda-runtime-cu12==12.9.79"
cudart="$("$venv/bin/python" -c 'import nvidia.cuda_runtime, os; print(os.path.join(nvidia.cuda_runtime.__path__[0], "lib"))')"
cat > "$venv/bin/perf_analyzer-env" <<WRAPPER
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$cudart\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$(cd "$venv" && pwd)/bin/perf_analyzer" "\$@"
WRAPPER
chmod +x "$venv/bin/perf_analyzer-env"
"$venv/bin/perf_analyzer-env" --version >/dev/null  # fails here when a library is missing
echo "perf_analyzer: $venv/bin/perf_analyzer-env"
