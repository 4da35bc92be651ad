"""`fovea demo` end to end at test size: real demo data, real training, real server, real client.

The README's full demo (64 px, default epochs) is run by hand before a release; this keeps every
step of the orchestration honest in CI in about a minute.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_every_step_and_classifies_every_heldout_image(tmp_path: Path, fovea_env) -> None:
    workdir = tmp_path / "demo"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fovea.cli",
            "demo",
            "--workdir",
            str(workdir),
            "--weights",
            "none",
            "--input-size",
            "32",
            "--classes",
            "3",
            "--per-class",
            "20",
            "--heldout-per-class",
            "2",
            "--epochs",
            "1",
            "--fine-tune-epochs",
            "1",
        ],
        env=fovea_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = run.stdout
    assert run.returncode == 0, out[-4000:] + run.stderr[-4000:]
    for number in range(1, 9):
        assert f"[{number}/8]" in out, f"step {number} never started"
    heldout = sorted(p for p in (workdir / "heldout").rglob("*.png"))
    assert len(heldout) == 3 * 2
    for path in heldout:
        rel = str(path.relative_to(workdir / "heldout"))
        row = next((line for line in out.splitlines() if line.strip().startswith(rel)), None)
        assert row is not None, f"{rel} is not in the table"
        assert re.search(r"\s0\.\d{3}|\s1\.000", row), f"no score in {row!r}"
    assert "Predict requests: 6" in out
    assert "batches by size" in out and "request latency measured by the client" in out
    assert "training_curves.png" in out and "(missing)" not in out
    assert "server exited with code 0" in out


def test_demo_names_the_failing_step(tmp_path: Path, fovea_env) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    run = subprocess.run(
        [sys.executable, "-m", "fovea.cli", "demo", "--workdir", str(blocker / "demo")],
        env=fovea_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("fovea demo: error: step 1 (generate demo data) failed"), run.stderr
    assert "Traceback" not in run.stderr
