"""What a killed training job needs to resume: per-phase backups, histories, markers and weights.

Every file here is written to a temporary name and renamed into place, so a kill mid-write leaves the
previous content or nothing, never a torn file that would stop the restart.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fovea.trainer.config import TrainConfig
from fovea.trainer.layer_weights import load_weights, save_weights

# Changing these invalidates a backup: a restart with other values starts over.
_FINGERPRINT_IGNORES = {
    "verbose",
    "backup_dir",
    "demo_data_if_empty",
    "cache",
    "cache_limit_mb",
    "tensorboard",
}


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside the target, flush to disk, then rename over it (atomic on one file system)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_history(path: Path) -> list[dict[str, float]]:
    """Rows of a CSVLogger file; a row repeated by a resumed run counts once (the last one)."""
    if not path.is_file():
        return []
    rows: dict[int, dict[str, float]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            try:
                rows[int(row["epoch"])] = {k: float(v) for k, v in row.items() if k != "epoch" and v != ""}
            except (KeyError, ValueError):
                continue
    return [{"epoch": e, **rows[e]} for e in sorted(rows)]


def best_epoch_of(history: list[dict[str, float]]) -> int | None:
    scored = [(row["val_loss"], row["epoch"]) for row in history if "val_loss" in row]
    return int(min(scored)[1]) if scored else None


class RunBackup:
    """The files that let a restarted job resume: per-phase BackupAndRestore folders, histories, marker."""

    def __init__(self, root: str, task: tuple[str, int, bool]):
        kind, index, chief = task
        self.root = Path(root)
        # BackupAndRestore writes the chief's state to root and the others' to temporary folders itself;
        # our own files (marker, weights, histories) go per worker so workers never clobber each other.
        self.own = self.root if chief else self.root / f".{kind}-{index}"
        # The outermost folder this run creates (None when resuming into one that exists): what
        # discard() removes. A worker never claims the chief's root.
        missing = [p for p in [self.own, *self.own.parents] if not p.exists()]
        self.created: Path | None = (missing[-1] if chief else self.own) if missing else None
        self.own.mkdir(parents=True, exist_ok=True)

    def checkpoints(self, phase: int) -> str:
        return str(self.root / f"phase{phase}")

    def history(self, phase: int) -> Path:
        return self.own / f"phase{phase}.csv"

    def weights(self, phase: int) -> Path:
        return self.own / f"phase{phase}.weights.npz"

    def marker(self, phase: int) -> Path:
        """Written when a phase is complete: a restart loads its weights instead of redoing it."""
        return self.own / f"phase{phase}.done.json"

    def best(self, phase: int) -> tuple[Path, Path]:
        """The best epoch of a phase so far ({epoch, val_loss}) and its weights; they survive restarts."""
        return self.own / f"phase{phase}.best.json", self.own / f"phase{phase}.best.weights.npz"

    def run_id(self) -> str:
        """One id per training run, the same after every restart (kept in run.json)."""
        return str(json.loads((self.own / "run.json").read_text()).get("run_id", ""))

    def remove(self) -> None:
        """Delete this worker's files only (others may still be reading theirs); the last one out
        removes the folder."""
        if self.own != self.root:
            shutil.rmtree(self.own, ignore_errors=True)
        else:
            for child in self.root.iterdir():
                if child.is_dir() and child.name.startswith("."):
                    continue  # another worker's folder
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty yet: another worker is still finishing
            self.root.rmdir()

    def discard(self) -> str | None:
        """Remove the backup this run created (a run that cannot finish on a full disk leaves no
        partial one); a backup that was there before, which a restart can resume from, stays."""
        if self.created is None:
            return None
        shutil.rmtree(self.created, ignore_errors=True)
        return str(self.created)

    def check_fingerprint(self, cfg: TrainConfig, log: Callable[[str], None]) -> None:
        """Start over when the backup belongs to a run with other settings."""
        wanted = {k: v for k, v in cfg.to_dict().items() if k not in _FINGERPRINT_IGNORES}
        path = self.own / "run.json"
        if path.is_file():
            try:
                found = json.loads(path.read_text())
            except ValueError:
                found = {}
            run_id = found.pop("run_id", None) if isinstance(found, dict) else None
            if found == wanted and run_id:
                log(f"resuming from the backup in {self.root}")
                return
            log(f"the backup in {self.root} is from a run with other settings: starting over")
            for child in self.own.iterdir():
                if child.name.startswith(".") and child.is_dir():
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        write_text_atomic(path, json.dumps({**wanted, "run_id": uuid.uuid4().hex}, sort_keys=True))


def keep_best(backup: RunBackup, phase: int, model: Any) -> Any:
    """A Keras callback that saves the phase's best weights (by val_loss) whenever an epoch beats them.

    EarlyStopping(restore_best_weights) remembers the best only in memory, so after a restart mid-phase
    it would restore the best epoch since the restart. This record survives, and restore_best() loads
    it when the phase ends: the weights kept are the best of the whole phase. It must run before
    BackupAndRestore, so an epoch the backup calls done has its best already on disk.
    """
    import tf_keras as keras

    record, weights = backup.best(phase)

    class KeepBest(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            val_loss = (logs or {}).get("val_loss")
            if val_loss is None or not math.isfinite(float(val_loss)):
                return
            best = read_best(backup, phase)
            if best is None or float(val_loss) < best["val_loss"]:
                save_weights(model, weights)
                write_text_atomic(record, json.dumps({"epoch": int(epoch), "val_loss": float(val_loss)}))

    return KeepBest()


def read_best(backup: RunBackup, phase: int) -> dict[str, float] | None:
    record, weights = backup.best(phase)
    if not (record.is_file() and weights.is_file()):
        return None
    return json.loads(record.read_text())


def restore_best(backup: RunBackup, phase: int, model: Any) -> dict[str, float] | None:
    """Load the phase's best weights into the model; returns the record, or None when there is none."""
    best = read_best(backup, phase)
    if best is not None:
        load_weights(model, backup.best(phase)[1])
    return best
