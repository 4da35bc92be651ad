"""What a training run measured, typed: the trainer, its command, the export and the report share it."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Evaluation:
    """Test-split scores. per_class: label -> {precision, recall, f1, support}; confusion rows are truth."""

    accuracy: float
    macro_f1: float
    support: int
    per_class: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]]
    labels: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainMetrics:
    """One run's results; to_dict() is report/metrics.json, exported() goes into fovea.json."""

    test_accuracy: float
    test: Evaluation
    best_epoch: int | None  # over both phases, numbered from 1 as Keras prints epochs
    best_val_loss: float | None
    fine_tune_start_epoch: int | None  # the first epoch of phase 2, None when it was skipped
    phase1_epochs: int
    phase2_epochs: int
    unfrozen_layers: int
    history: list[dict[str, float]]  # one row per epoch: epoch, loss, accuracy, val_loss, ...
    images: dict[str, dict[str, int]]  # split -> label -> count
    layout: str
    skipped_files: list[dict[str, str]]  # {"path", "reason"}
    replicas: int
    # Measured once, from the start of the run to the end of the test evaluation (data, both phases,
    # the test); the CLI, the report and metrics.json all show this one figure.
    train_seconds: float
    augment: str = "photo"  # the preset
    augmentation: dict[str, Any] = dataclasses.field(default_factory=dict)  # the values used
    parent: str = ""  # the published version training started from, if any
    parent_mode: str = ""  # "continue" (same classes) or "new head" (other classes)
    run_id: str = ""  # one per training run, kept across restarts: a rerun never publishes twice
    backbone: str = ""
    input_size: int = 0  # pixels, square
    weights: str = ""  # what the base started from, in words (chance.weights_text)
    warnings: list[str] = dataclasses.field(default_factory=list)  # e.g. a test accuracy near chance
    gate: dict[str, Any] | None = None  # the publish gate's comparison (gate.GateDecision), None when off

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def exported(self) -> dict[str, Any]:
        """For fovea.json: no per-epoch history, and only the number of skipped files."""
        out = {k: v for k, v in self.to_dict().items() if k not in ("history", "skipped_files")}
        out["skipped_files"] = len(self.skipped_files)
        return out
