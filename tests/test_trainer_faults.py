"""Trainer faults (issue 10): a kill after publishing, two trainers on one model, stale temporaries,
torn phase markers, and the best weights of a phase split by a restart."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the trainer tests need the trainer extra")

from _models import export_tiny, tiny_train_config
from conftest import subprocess_env
from fovea.trainer import resume, train
from fovea.trainer.config import TrainConfig
from fovea.trainer.demo_data import generate
from fovea.trainer.model_lock import ModelBusyError, model_lock


def _tiny_config(tmp_path: Path, **extra) -> TrainConfig:
    data = tmp_path / "data"
    if not data.exists():
        generate(data, classes=2, per_class=8, size=32, seed=0)
    return tiny_train_config(data, tmp_path / "models", **extra)


@pytest.mark.slow
def test_a_rerun_after_a_kill_right_after_publishing_does_not_publish_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _tiny_config(tmp_path)
    atomic_writes: list[str] = []
    real_write = resume.write_text_atomic
    monkeypatch.setattr(
        train, "write_text_atomic", lambda p, t: (atomic_writes.append(p.name), real_write(p, t))
    )

    def killed(self) -> None:
        raise KeyboardInterrupt("killed after publishing, before the backup was removed")

    monkeypatch.setattr(resume.RunBackup, "remove", killed)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, log=lambda msg: None)
    assert (tmp_path / "models" / "m" / "1").is_dir()
    assert "phase1.done.json" in atomic_writes, "the phase marker was not written atomically"

    monkeypatch.undo()
    lines: list[str] = []
    result = train.run(cfg, log=lines.append)
    published = sorted(p.name for p in (tmp_path / "models" / "m").iterdir() if not p.name.startswith("."))
    assert published == ["1"], f"the rerun published again: {published}"
    assert result.version_path == str(tmp_path / "models" / "m" / "1")
    assert any("already published" in line for line in lines), lines
    assert not (tmp_path / "models" / "m" / ".backup").exists()


def test_a_second_trainer_on_the_same_model_is_refused_and_a_killed_holder_frees_the_lock(
    tmp_path: Path,
) -> None:
    cfg = _tiny_config(tmp_path)
    busy = rf"pid {os.getpid()} on {socket.gethostname()}"
    with model_lock(cfg.models, "m", log=lambda msg: None), pytest.raises(ModelBusyError, match=busy):
        train.run(cfg, log=lambda msg: None)
    assert not (tmp_path / "models" / "m" / ".backup").exists(), "the refused trainer touched the backup"

    # The lock belongs to the process: SIGKILL frees it, so a killed run's restart is never locked out.
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time\n"
            "from fovea.trainer.model_lock import model_lock\n"
            f"with model_lock({cfg.models!r}, 'm', print):\n"
            "    print('locked', flush=True); time.sleep(120)\n"
        )],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(),
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(ModelBusyError, match=rf"pid {holder.pid}"), model_lock(cfg.models, "m", print):
            pass
    finally:
        holder.kill()
        holder.wait()
    with model_lock(cfg.models, "m", log=lambda msg: None):
        pass
    assert not (tmp_path / "models" / "m" / ".train.lock").exists(), "a finished holder left its lock file"


def test_stale_temporary_exports_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    root = tmp_path / "models" / "tiny"
    root.mkdir(parents=True)
    host = socket.gethostname()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folders = {
        "dead": root / f".tmp-{host}-{gone.pid}-aaaa",  # its exporter on this host has exited
        "old": root / ".tmp-elsewhere-12-bbbb",  # another host's, untouched for a day
        "live": root / f".tmp-{host}-{os.getpid()}-cccc",  # a live exporter's (this process)
        "recent": root / ".tmp-elsewhere-34-dddd",  # another host's, written a minute ago
    }
    for folder in folders.values():
        (folder / "variables").mkdir(parents=True)
        (folder / "variables" / "x").write_text("partial")
    day_ago = time.time() - 24 * 3600
    for path in [folders["old"], folders["old"] / "variables", folders["old"] / "variables" / "x"]:
        os.utime(path, (day_ago, day_ago))

    export_tiny(tmp_path / "models")
    left = sorted(p.name for p in root.iterdir())
    assert left == sorted(["1", folders["live"].name, folders["recent"].name]), left


def test_write_text_atomic_leaves_the_old_content_when_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "phase1.done.json"
    resume.write_text_atomic(marker, json.dumps({"epochs": 3}))

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(resume.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        resume.write_text_atomic(marker, json.dumps({"epochs": 4}))
    assert json.loads(marker.read_text()) == {"epochs": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["phase1.done.json"], "a temporary file was left"


def test_the_best_weights_of_a_phase_survive_a_restart(tmp_path: Path) -> None:
    """EarlyStopping alone would keep the best epoch since the restart (epoch 3); the record keeps 1."""
    import tf_keras as keras
    from _models import build_tiny_model
    from fovea.trainer.layer_weights import get_layer_weights

    keras.backend.clear_session()  # both builds get the same layer names, as two processes would
    backup = resume.RunBackup(str(tmp_path / "backup"), ("worker", 0, True))
    model = build_tiny_model(seed=1)
    best_weights = get_layer_weights(model)
    callback = resume.keep_best(backup, 1, model)
    callback.on_epoch_end(0, {"val_loss": 0.9})
    callback.on_epoch_end(1, {"val_loss": 0.5})  # the best of the phase: saved
    model.set_weights([w + 1.0 for w in model.get_weights()])
    callback.on_epoch_end(2, {"val_loss": 0.7})

    # Killed; the restarted process builds a new model and resumes at epoch 3, which is worse.
    keras.backend.clear_session()
    restarted = build_tiny_model(seed=2)
    callback = resume.keep_best(backup, 1, restarted)
    callback.on_epoch_end(3, {"val_loss": 0.6})
    callback.on_epoch_end(4, {"val_loss": float("nan")})
    record = resume.restore_best(backup, 1, restarted)
    assert record == {"epoch": 1, "val_loss": 0.5}
    for key, values in get_layer_weights(restarted).items():
        for got, want in zip(values, best_weights[key], strict=True):
            np.testing.assert_array_equal(got, want)
    callback.on_epoch_end(5, {"val_loss": 0.4})  # a better epoch after the restart replaces it
    assert resume.read_best(backup, 1) == {"epoch": 5, "val_loss": 0.4}
