"""Triton's perf_analyzer against fovea, with no extra flags (UINT8) and on JPEGs via --input-data.

perf_analyzer is a C++ binary bundled in the tritonclient 2.41.0 wheel; it needs Debian's libb64-0d
and libcudart.so.12. scripts/install_perf_analyzer.sh installs it in a venv of its own with a wrapper
that sets LD_LIBRARY_PATH; FOVEA_PERF_ANALYZER names that wrapper (.ci/run sets it). Without it the
test looks for `perf_analyzer` on PATH, and skips with the reason when none runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the server tests need the server extra")

from _models import export_tiny
from _serving import sample, serving
from fovea.client.perf_data import input_data
from PIL import Image

MODEL = "tiny"
# Count windows of a few requests keep each run to about 3 s; 100 % stability accepts the first
# windows, since the point is that every call perf_analyzer makes succeeds, not a steady number.
QUICK = ["--measurement-mode", "count_windows", "--measurement-request-count", "50", "-s", "100"]


def _perf_analyzer() -> str:
    path = os.environ.get("FOVEA_PERF_ANALYZER") or shutil.which("perf_analyzer")
    if not path:
        pytest.skip(
            "perf_analyzer not found: run scripts/install_perf_analyzer.sh and set FOVEA_PERF_ANALYZER"
        )
    probe = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        reason = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"perf_analyzer at {path} does not run here: {reason[0]}")
    return path


@pytest.fixture(scope="module")
def perf_analyzer() -> str:
    return _perf_analyzer()


@pytest.fixture(scope="module")
def server(tmp_path_factory, perf_analyzer):
    models = tmp_path_factory.mktemp("models")
    export_tiny(models, MODEL, 32, seed=6)
    with serving(models, max_batch_size=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory) -> Path:
    """`fovea perf-data`'s document for a few JPEGs of different sizes."""
    folder = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i, size in enumerate((20, 48, 90)):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    out = folder / "data.json"
    out.write_text(json.dumps(input_data([folder])))
    return out


def run(perf_analyzer: str, *args: str) -> str:
    done = subprocess.run([perf_analyzer, *args, *QUICK], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "Throughput:" in done.stdout and "Successful request count" in done.stdout, done.stdout[-3000:]
    return done.stdout


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_with_no_extra_flags(server, perf_analyzer: str, protocol: str) -> None:
    port = server.port if protocol == "grpc" else server.http_port
    label = f"v2-{protocol}"
    before = sample(server, "fovea_requests_total", protocol=label, method="ModelInfer", code="OK")
    run(perf_analyzer, "-i", protocol, "-u", f"127.0.0.1:{port}", "-m", MODEL)
    assert (
        sample(server, "fovea_requests_total", protocol=label, method="ModelInfer", code="OK") >= before + 50
    )
    assert sample(server, "fovea_requests_total", protocol=label, method="ModelStatistics", code="OK") > 0


def test_perf_analyzer_on_jpegs_from_perf_data(server, perf_analyzer: str, jpeg_data: Path) -> None:
    before = sample(server, "fovea_requests_total", protocol="v2-grpc", method="ModelInfer", code="OK")
    out = run(
        perf_analyzer, "-i", "grpc", "-u", f"127.0.0.1:{server.port}", "-m", f"{MODEL}-encoded",
        "--input-data", str(jpeg_data),
    )  # fmt: skip
    assert "compute input" in out
    assert (
        sample(server, "fovea_requests_total", protocol="v2-grpc", method="ModelInfer", code="OK")
        >= before + 50
    )
