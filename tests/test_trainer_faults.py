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


def _model_root_host_and_dead_pid(tmp_path: Path, name: str) -> tuple[Path, str, int]:
    """A model folder, this host's name, and the pid of a process of this host that has exited."""
    root = tmp_path / "models" / name
    root.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return root, socket.gethostname(), gone.pid


def test_stale_temporary_exports_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    root, host, dead_pid = _model_root_host_and_dead_pid(tmp_path, "tiny")
    folders = {
        "dead": root / f".tmp-{host}-{dead_pid}-aaaa",  # its exporter on this host has exited
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


# -- full disks (issue 23) -------------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, int]:
    """Every path under a folder, with its modification time for files (a folder's changes when a
    lock file comes and goes): what a failed run must leave as it was."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.is_file() and p.stat().st_mtime_ns for p in folder.rglob("*")}


def _train_cli(cfg: TrainConfig, capsys, monkeypatch, *flags: str) -> tuple[int, list[str]]:
    """`fovea train` in this process (so seams apply): its exit code and its stderr lines."""
    from fovea.cli import TF_LOGS_ENV, main

    monkeypatch.setenv(TF_LOGS_ENV, "1")  # no captured start-up lines in this process
    capsys.readouterr()
    argv = [
        "train",
        "--data",
        cfg.data,
        "--models",
        cfg.models,
        "--name",
        cfg.name,
        "--backbone",
        cfg.backbone,
    ]
    argv += ["--weights", "none", "--input-size", "32", "--epochs", "1", "--fine-tune-epochs", "0"]
    argv += ["--batch-size", "8", "--verbose", "0"]  # fmt: skip
    code = main([*argv, *flags])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_filesystem_too_small_is_refused_up_front_in_one_line(tmp_path: Path) -> None:
    # A real small file system when this process may mount one (root, as in the dev container);
    # test_too_little_free_space_for_the_backup_is_refused_up_front fakes the probe instead.
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or mounted.returncode}")
    try:
        cfg = _tiny_config(tmp_path)
        run = subprocess.run(
            [sys.executable, "-m", "fovea.cli", "train", "--data", cfg.data, "--models", str(disk),
             "--backbone", "vgg16", "--weights", "none", "--input-size", "32", "--epochs", "1",
             "--fine-tune-epochs", "0", "--name", "m"],
            capture_output=True, text=True, env=subprocess_env(), timeout=300,
        )  # fmt: skip
        # Before: trained, then OSError [Errno 28] from a checkpoint save, a traceback and a 43 MB .backup.
        assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
        errors = [line for line in run.stderr.splitlines() if line.startswith("fovea train: error:")]
        assert len(errors) == 1, run.stderr[-3000:]
        # vgg16, 14.7M parameters: a 64 MiB version and a 225 MiB backup (4 x the weights), on 20 MiB.
        assert errors[0].startswith(f"fovea train: error: not enough disk space: {disk}/m needs "), errors
        assert "(a version " in errors[0] and "+ the backup " in errors[0] and "MiB free" in errors[0], errors
        assert list(disk.iterdir()) == [], "the refused run left files behind"
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_the_disk_check_knows_each_backbones_parameter_count() -> None:
    from fovea.contract import BACKBONES
    from fovea.trainer.backbones import build_base
    from fovea.trainer.disk_space import BACKBONE_PARAMS

    assert sorted(BACKBONE_PARAMS) == sorted(BACKBONES)
    for name in BACKBONES:
        assert build_base(name, 32, "none").count_params() == BACKBONE_PARAMS[name], name


def test_too_little_free_space_for_the_backup_is_refused_up_front(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fovea.trainer import disk_space

    cfg = _tiny_config(tmp_path)
    export_tiny(tmp_path / "models", "m")  # a published version: its size is the version's estimate
    backup = tmp_path / "scratch" / "backup"
    before = _tree(tmp_path / "models")
    real_free = disk_space.free_bytes
    # The backup's disk (a different device is not needed: the probe is asked per path) has 5 MiB.
    monkeypatch.setattr(
        disk_space, "free_bytes", lambda p: 5 * disk_space.MIB if "scratch" in p else real_free(p)
    )
    monkeypatch.setattr(disk_space, "_device", lambda p: 1 if "scratch" in p else 2)
    code, err = _train_cli(cfg, capsys, monkeypatch, "--backup-dir", str(backup))
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"fovea train: error: not enough disk space: {backup} needs "), err
    assert err[0].endswith("and has 5 MiB free"), err
    assert _tree(tmp_path / "models") == before and not (tmp_path / "scratch").exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["checkpoint", "export"])
def test_a_disk_that_fills_up_mid_run_fails_in_one_line_and_leaves_no_temporaries(
    where: str, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import tensorflow as tf

    cfg = _tiny_config(tmp_path)
    export_tiny(tmp_path / "models", "m")  # published before: must stay as it was
    before = _tree(tmp_path / "models")
    if where == "checkpoint":
        # The best-weights save at the first epoch's end: numpy reports ENOSPC as OSError 28.
        def full(model, path) -> None:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(resume, "save_weights", full)
    else:
        # TensorFlow's writers report it as text in an OpError, after writing part of the SavedModel.
        real_save = tf.saved_model.save

        def full(module, path, signatures=None) -> None:
            real_save(module, path, signatures=signatures)
            raise tf.errors.ResourceExhaustedError(None, None, f"{path}/variables: No space left on device")

        monkeypatch.setattr(tf.saved_model, "save", full)
    code, err = _train_cli(cfg, capsys, monkeypatch)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("fovea train: error: the disk filled up"), err
    assert f"removed {tmp_path / 'models' / 'm' / '.backup'}" in err[0], err
    # No backup, no .tmp-* folder, no lock: exactly the files there were before.
    assert _tree(tmp_path / "models") == before


def test_the_next_run_removes_temporaries_a_killed_run_left(tmp_path: Path) -> None:
    root, host, dead_pid = _model_root_host_and_dead_pid(tmp_path, "m")
    killed = {
        "here": root / f".tmp-{host}-{dead_pid}-aaaa",  # a killed trainer's on this host, with a file
        "elsewhere": root / ".tmp-pod-b7f2-12-bbbb",  # a killed pod's (another host), empty, just now
    }
    (killed["here"] / "variables").mkdir(parents=True)
    (killed["here"] / "variables" / "x").write_text("partial")
    killed["elsewhere"].mkdir()
    live = root / f".tmp-{host}-{os.getpid()}-cccc"  # a live exporter's on this host: kept
    live.mkdir()
    lines: list[str] = []
    # The cleanup runs under the model's lock before the data is read: a missing data folder stops
    # the run right after it.
    cfg = tiny_train_config(tmp_path / "no-data", tmp_path / "models")
    with pytest.raises(Exception, match="not found"):
        train.run(cfg, log=lines.append)
    assert sorted(p.name for p in root.iterdir()) == [live.name]
    assert sum("left by a killed run" in line for line in lines) == 2, lines
