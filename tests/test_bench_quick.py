"""The benchmark harness still works end to end: its quick mode (tiny model, seconds) against a real server.

Figures are not asserted (they depend on the machine); the harness's outputs and their shape are.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_every_output(tmp_path: Path, fovea_env: dict[str, str]) -> None:
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
        env=fovea_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in (
        "results.csv",
        "results.md",
        "summary.json",
        "throughput_vs_concurrency.png",
        "latency_vs_throughput.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "results.csv").open()))
    served = [r for r in rows if r["setup"] == "batched"]
    assert {r["encoding"] for r in served} == {"uint8", "jpeg"}
    assert all(float(r["throughput"]) > 0 and r["errors"] == "0" for r in served)
    assert any(r["setup"] == "raw signature" for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("efficiency", "overhead_ms", "server_peak_rss_mb"):
        assert math.isfinite(summary[key]), key
    assert "efficiency" in run.stdout and "overhead" in run.stdout
