"""What a killed training job needs to resume: per-phase backups, histories, markers and weights."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fovea.trainer.config import TrainConfig

# Changing these invalidates a backup: a restart with other values starts over.
_FINGERPRINT_IGNORES = {"verbose", "backup_dir", "demo_data_if_empty", "cache", "cache_limit_mb"}


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

    def check_fingerprint(self, cfg: TrainConfig, log: Callable[[str], None]) -> None:
        """Start over when the backup belongs to a run with other settings."""
        wanted = {k: v for k, v in cfg.to_dict().items() if k not in _FINGERPRINT_IGNORES}
        path = self.own / "run.json"
        if path.is_file():
            try:
                found = json.loads(path.read_text())
            except ValueError:
                found = None
            if found == wanted:
                log(f"resuming from the backup in {self.root}")
                return
            log(f"the backup in {self.root} is from a run with other settings: starting over")
            for child in self.own.iterdir():
                if child.name.startswith(".") and child.is_dir():
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        path.write_text(json.dumps(wanted, sort_keys=True))


def _walk_layers(model: Any, prefix: str = ""):
    """(path, layer) of every layer holding weights, nested models expanded; augmentation layers
    (whose only state is a random generator) left out."""
    for layer in model.layers:
        if getattr(layer, "layers", None):
            yield from _walk_layers(layer, f"{prefix}{layer.name}|")
        elif layer.weights and not layer.name.startswith("aug_"):
            yield prefix + layer.name, layer


def get_layer_weights(model: Any) -> dict[str, list[np.ndarray]]:
    """Weights keyed by layer path. Whole-model weight lists are ordered by trainability, which
    phase 2 changes, and .h5 loading trips over distributed variables; this does neither."""
    return {path: [np.asarray(w.numpy()) for w in layer.weights] for path, layer in _walk_layers(model)}


def set_layer_weights(model: Any, weights: dict[str, list[np.ndarray]]) -> None:
    for path, layer in _walk_layers(model):
        layer.set_weights(weights[path])


def save_weights(model: Any, path: Path) -> None:
    arrays = {
        f"{key}#{i}": value
        for key, values in get_layer_weights(model).items()
        for i, value in enumerate(values)
    }
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)  # a kill mid-write never leaves a half file under the real name


def load_weights(model: Any, path: Path) -> None:
    with np.load(path) as f:
        weights: dict[str, list[np.ndarray]] = {}
        for key in sorted(f.files, key=lambda k: (k.rsplit("#", 1)[0], int(k.rsplit("#", 1)[1]))):
            weights.setdefault(key.rsplit("#", 1)[0], []).append(f[key])
    set_layer_weights(model, weights)
