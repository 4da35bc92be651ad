"""`fovea train` as real processes: killed and restarted, and two workers with TF_CONFIG."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("tensorflow", reason="the trainer tests need the trainer extra")

from conftest import subprocess_env
from fovea.trainer.demo_data import generate


def _train_cmd(data: Path, models: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "fovea.cli", "train", "--data", str(data), "--models", str(models),
        "--name", "m", "--backbone", "vgg16", "--weights", "none", "--input-size", "32",
        "--batch-size", "8", "--verbose", "2", *extra,
    ]  # fmt: skip


def _run_until(cmd: list[str], marker: str | None, timeout: float = 300) -> tuple[list[str], int | None]:
    """Run cmd; SIGKILL it as soon as a line starting with `marker` appears. Returns (lines, exit code)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env()
    )
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if marker and line.startswith(marker):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return lines, None
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out; output so far:\n{''.join(lines[-30:])}")
    return lines, proc.wait()


def _epoch_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("Epoch ") and "/" in line.split()[1]]


def test_a_killed_run_restarted_with_the_same_command_continues_at_the_next_epoch(tmp_path: Path) -> None:
    data, models = tmp_path / "data", tmp_path / "models"
    generate(data, classes=2, per_class=10, size=32, seed=0)
    cmd = _train_cmd(data, models, "--epochs", "3", "--fine-tune-epochs", "2", "--patience", "10")

    # Killed in phase 1 once epoch 2 is done (Keras announces epoch 3 after epoch 2's backup is written).
    lines, code = _run_until(cmd, "Epoch 3/3")
    assert code is None, "\n".join(lines)
    # Restarted: continues at epoch 3; killed in phase 2 once epoch 4 is done.
    lines, code = _run_until(cmd, "Epoch 5/5")
    assert code is None, "\n".join(lines)
    assert _epoch_lines(lines)[0].startswith("Epoch 3/3"), "\n".join(lines)
    # Restarted again: phase 1 is skipped and phase 2 continues at epoch 5; killed once training is
    # over, before the version is published.
    lines, code = _run_until(cmd, "test accuracy")
    out = "\n".join(lines)
    assert code is None, out
    assert "phase 1 already done (3 epochs)" in out
    assert _epoch_lines(lines)[0].startswith("Epoch 5/5"), out
    assert not (models / "m" / "1").exists()
    # The last restart trains no more: it evaluates and publishes.
    lines, code = _run_until(cmd, None)
    out = "\n".join(lines)
    assert code == 0, out
    assert "phase 1 already done" in out and "phase 2 already done" in out
    assert not _epoch_lines(lines), out
    version = models / "m" / "1"
    assert f"Published {version}" in out
    history = json.loads((version / "report" / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (models / "m").iterdir()) == ["1"], (
        "backup or temporary folders left behind"
    )


def _free_port() -> int:
    # TF_CONFIG needs the addresses before the workers start, so a port is picked and released here.
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_workers_with_tf_config_train_and_publish_exactly_one_version(tmp_path: Path) -> None:
    data, models = tmp_path / "data", tmp_path / "models"
    generate(data, classes=2, per_class=12, size=32, seed=0)
    workers = [f"localhost:{_free_port()}", f"localhost:{_free_port()}"]
    cmd = _train_cmd(data, models, "--epochs", "1", "--fine-tune-epochs", "1", "--steps-per-epoch", "2")
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        log = (tmp_path / f"worker{index}.log").open("w")
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env=subprocess_env(TF_CONFIG=tf_config),
                cwd=tmp_path,
            )
        )
    try:
        codes = [p.wait(timeout=420) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    assert "multi-worker training: 2 replicas" in outs[0] and "multi-worker training: 2 replicas" in outs[1]
    assert f"Published {models / 'm' / '1'}" in outs[0]
    assert "the chief publishes" in outs[1] and "Published" not in outs[1]
    assert sorted(p.name for p in (models / "m").iterdir() if not p.name.startswith(".")) == ["1"]
