"""bench/batcher_sim.py in CI: the batching and admission defaults across model speeds.

The simulator runs in virtual time (a sleeping model that costs no CPU and no wall-clock time), so
its result does not depend on how busy the machine is; it fails below 0.9 of the ideal batch's
throughput on any cost curve, on any shed closed loop, or on an open-loop p99 more than 5% worse
than Triton's rule.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_batcher_sim_holds_on_every_cost_curve(tmp_path: Path, fovea_env) -> None:
    out = tmp_path / "sim.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "batcher_sim.py"),
            "--batches",
            "100",
            "--check",
            "0.9",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=fovea_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    curves = {r["curve"] for r in rows}
    assert {"host", "host/10", "host/100", "gpu", "host*4"} <= curves
    closed = [r for r in rows if r["mode"] == "closed"]
    assert len(closed) == 4 * len(curves) and all(r["shed"] == 0 for r in closed)
    print(
        "closed-loop ratio to the ideal batch:", sorted((r["curve"], r["level"], r["ratio"]) for r in closed)
    )
