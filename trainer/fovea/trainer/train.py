"""Two-phase transfer learning, resumable, single- or multi-worker, ending in a published version.

Phase 1 trains the new head on a frozen base (Adam, --learning-rate). Phase 2 unfreezes the top of the
base, BatchNorm excepted, and recompiles at --fine-tune-learning-rate. Each phase has its own
EarlyStopping(val_loss, restore_best_weights) and ReduceLROnPlateau, a BackupAndRestore folder so a
killed job resumes at its next epoch, and a CSV history. When phase 1 ends its weights and a marker
are saved, so a restart during phase 2 skips phase 1.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fovea.trainer import data as data_mod
from fovea.trainer.config import TrainConfig

# Changing these invalidates a backup: a restart with other values starts over.
_FINGERPRINT_IGNORES = {"verbose", "backup_dir", "demo_data_if_empty", "cache", "cache_limit_mb"}


@dataclasses.dataclass
class TrainResult:
    """What a run produced. version_path is None on workers other than the chief."""

    version_path: str | None
    metrics: dict[str, Any]
    model: Any
    dataset: data_mod.Dataset
    config: TrainConfig
    is_chief: bool


def tf_config_from_indexed_job() -> None:
    """Build TF_CONFIG from FOVEA_WORKER_HOSTS and JOB_COMPLETION_INDEX (a Kubernetes Indexed Job)."""
    if os.environ.get("TF_CONFIG"):
        return
    hosts = [h.strip() for h in os.environ.get("FOVEA_WORKER_HOSTS", "").split(",") if h.strip()]
    index = os.environ.get("JOB_COMPLETION_INDEX")
    if len(hosts) > 1 and index is not None:
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": int(index)}}
        )


def _task() -> tuple[str, int, bool]:
    """(task type, index, is chief) from TF_CONFIG; a lone process is the chief."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return "worker", 0, True
    conf = json.loads(raw)
    task = conf.get("task", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    has_chief = "chief" in conf.get("cluster", {})
    return kind, index, kind == "chief" or (not has_chief and kind == "worker" and index == 0)


def make_strategy(log: Callable[[str], None]):
    """MultiWorkerMirrored when TF_CONFIG is set, Mirrored on several GPUs, else the default."""
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        log(f"multi-worker training: {strategy.num_replicas_in_sync} replicas (TF_CONFIG)")
        return strategy
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
        log(f"training on {strategy.num_replicas_in_sync} GPUs (MirroredStrategy)")
        return strategy
    log(f"training on {'1 GPU' if gpus else 'the CPU'}")
    return tf.distribute.get_strategy()


def _use_mixed_precision(cfg: TrainConfig) -> bool:
    import tensorflow as tf

    if cfg.mixed_precision == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return cfg.mixed_precision == "on"


def _read_history(path: Path) -> list[dict[str, float]]:
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


def _best_epoch(history: list[dict[str, float]]) -> int | None:
    scored = [(row["val_loss"], row["epoch"]) for row in history if "val_loss" in row]
    return int(min(scored)[1]) if scored else None


class _Backup:
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


def _callbacks(cfg: TrainConfig, backup: _Backup, phase: int) -> list[Any]:
    import tf_keras as keras

    # New instances per phase: EarlyStopping and ReduceLROnPlateau keep state between fits otherwise.
    return [
        keras.callbacks.BackupAndRestore(backup.checkpoints(phase)),
        keras.callbacks.EarlyStopping(
            monitor="val_loss",
            patience=cfg.patience,
            restore_best_weights=True,
            verbose=1 if cfg.verbose else 0,
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss",
            factor=cfg.reduce_lr_factor,
            patience=cfg.reduce_lr_patience,
            verbose=1 if cfg.verbose else 0,
        ),
        keras.callbacks.CSVLogger(str(backup.history(phase)), append=True),
    ]


def _compile(model: Any, cfg: TrainConfig, learning_rate: float) -> None:
    import tf_keras as keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


def run(
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    on_event: Callable[[str, Any, Any], None] | None = None,
) -> TrainResult:
    """Train, evaluate, report and (on the chief) publish. Raises DataError/WeightsError/ValueError.

    on_event(event, model, base) is called at "built", "phase1_end" and "phase2_end" (tests inspect
    the weights there).
    """
    notify = on_event or (lambda event, model, base: None)
    cfg.validate()
    cfg = cfg.resolved()
    tf_config_from_indexed_job()
    started = time.monotonic()

    if cfg.demo_data_if_empty and not data_mod.has_images(cfg.data):
        from fovea.trainer.demo_data import generate

        counts = generate(cfg.data, seed=cfg.seed)
        log(
            f"{cfg.data} held no images: generated demo data ({len(counts)} classes x {next(iter(counts.values()))})"
        )

    dataset = data_mod.load_dataset(
        cfg.data, val_split=cfg.val_split, test_split=cfg.test_split, seed=cfg.seed
    )
    counts = {s: sum(c.values()) for s, c in dataset.counts().items()}
    log(
        f"{len(dataset.labels)} classes ({', '.join(dataset.labels)}); images: train {counts['train']}, "
        f"val {counts['val']}, test {counts['test']}; skipped {len(dataset.skipped)} unreadable files"
    )
    for item in dataset.skipped[:20]:
        log(f"  skipped {item['path']}: {item['reason']}")

    import tf_keras as keras

    strategy = make_strategy(log)
    task = _task()
    is_chief = task[2]
    if _use_mixed_precision(cfg):
        keras.mixed_precision.set_global_policy("mixed_float16")
        log("mixed_float16 compute")

    num_classes = len(dataset.labels)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.batch_size * replicas
    cache = cfg.cache == "memory" or (
        cfg.cache == "auto"
        and data_mod.fits_in_cache(sum(counts.values()), cfg.input_size, cfg.cache_limit_mb)
    )
    stream = dict(num_classes=num_classes, input_size=cfg.input_size, seed=cfg.seed, cache=cache)
    train_ds = data_mod.make_stream(
        dataset.files["train"], dataset.targets["train"], batch_size=global_batch, training=True,
        repeat=cfg.steps_per_epoch > 0, **stream,
    )  # fmt: skip
    val_ds = data_mod.make_stream(
        dataset.files["val"], dataset.targets["val"], batch_size=global_batch, training=False, **stream
    )
    steps = cfg.steps_per_epoch or None
    class_weight = dataset.class_weights() if cfg.class_weights else None

    with strategy.scope():
        model, base = build_and_freeze(cfg, num_classes)
        _compile(model, cfg, cfg.learning_rate)
    notify("built", model, base)
    # Only now, so a run that fails on its data or weights leaves no backup folder behind.
    backup = _Backup(cfg.backup_dir, task)
    backup.check_fingerprint(cfg, log)

    fit = dict(steps_per_epoch=steps, validation_data=val_ds, class_weight=class_weight, verbose=cfg.verbose)

    # Phase 1: the head on a frozen base (skipped when a restarted job finds it done).
    if backup.marker(1).is_file():
        phase1 = json.loads(backup.marker(1).read_text())
        _load_weights(model, backup.weights(1))
        log(f"phase 1 already done ({phase1['epochs']} epochs): loaded its weights from {backup.weights(1)}")
    else:
        log(
            f"phase 1: training the head on a frozen {cfg.backbone} (up to {cfg.epochs} epochs, lr {cfg.learning_rate:g})"
        )
        model.fit(train_ds, epochs=cfg.epochs, callbacks=_callbacks(cfg, backup, 1), **fit)
        history1 = _read_history(backup.history(1))
        phase1 = {"epochs": len(history1), "best_epoch": _best_epoch(history1)}
        _save_weights(model, backup.weights(1))
        backup.marker(1).write_text(json.dumps(phase1))
    history1 = _read_history(backup.history(1))
    phase1_epochs = int(phase1["epochs"])
    best1 = min((r["val_loss"] for r in history1 if "val_loss" in r), default=float("inf"))
    notify("phase1_end", model, base)

    # Phase 2: fine-tune the top of the base at a low learning rate, BatchNorm kept in inference mode.
    history2: list[dict[str, float]] = []
    unfrozen: list[str] = []
    if cfg.fine_tune_epochs > 0:
        with strategy.scope():
            unfrozen = unfreeze_top(base, cfg.fine_tune_layers)
            _compile(model, cfg, cfg.fine_tune_learning_rate)
        if backup.marker(2).is_file():
            _load_weights(model, backup.weights(2))
            log(f"phase 2 already done: loaded its weights from {backup.weights(2)}")
        else:
            log(
                f"phase 2: fine-tuning {len(unfrozen)} layers of the base (up to {cfg.fine_tune_epochs} "
                f"epochs, lr {cfg.fine_tune_learning_rate:g})"
            )
            model.fit(
                train_ds,
                initial_epoch=phase1_epochs,
                epochs=phase1_epochs + cfg.fine_tune_epochs,
                callbacks=_callbacks(cfg, backup, 2),
                **fit,
            )
            notify("phase2_end", model, base)
            history2 = _read_history(backup.history(2))
            best2 = min((r["val_loss"] for r in history2 if "val_loss" in r), default=float("inf"))
            if best2 > best1:
                # Fine-tuning never beat the head alone: keep phase 1's best weights.
                _load_weights(model, backup.weights(1))
                log("phase 2 never beat phase 1's best val_loss: keeping phase 1's weights")
            _save_weights(model, backup.weights(2))
            backup.marker(2).write_text(json.dumps({"epochs": len(history2)}))
        history2 = _read_history(backup.history(2))

    history = history1 + history2
    # Every worker reads the final weights: under MultiWorkerMirroredStrategy reading a BatchNorm
    # statistic is a collective op, so the chief cannot do it alone after the others have exited.
    final_weights = get_layer_weights(model)
    best_epoch = _best_epoch(history)
    train_seconds = time.monotonic() - started

    from fovea.trainer import evaluate, report

    test_ds = data_mod.make_stream(
        dataset.files["test"], dataset.targets["test"], batch_size=global_batch, training=False, **stream
    )
    evaluation = evaluate.evaluate(model, test_ds, dataset.labels)
    log(f"test accuracy {evaluation['accuracy']:.4f} on {evaluation['support']} images")

    metrics = {
        "test_accuracy": evaluation["accuracy"],
        "test": evaluation,
        "best_epoch": best_epoch,
        "best_val_loss": min((r["val_loss"] for r in history if "val_loss" in r), default=None),
        "fine_tune_start_epoch": phase1_epochs if cfg.fine_tune_epochs > 0 else None,
        "phase1_epochs": phase1_epochs,
        "phase2_epochs": len(history2),
        "unfrozen_layers": len(unfrozen),
        "history": history,
        "images": dataset.counts(),
        "layout": dataset.layout,
        "skipped_files": dataset.skipped,
        "replicas": replicas,
        "train_seconds": round(train_seconds, 1),
    }

    version_path = None
    if is_chief:
        with tempfile.TemporaryDirectory(prefix="fovea-report-") as report_dir:
            report.write_report(report_dir, metrics=metrics, labels=dataset.labels)
            version_path = _export(cfg, final_weights, dataset.labels, metrics, report_dir)
        log(f"published {version_path}")
    # A finished run leaves no backup behind, so the next run of the same command trains anew.
    backup.remove()
    metrics["total_seconds"] = round(time.monotonic() - started, 1)
    return TrainResult(version_path, metrics, model, dataset, cfg, is_chief)


def build_and_freeze(cfg: TrainConfig, num_classes: int) -> tuple[Any, Any]:
    from fovea.trainer.model import build_model, freeze_base

    model, base = build_model(cfg, num_classes)
    freeze_base(base)
    return model, base


def _export(
    cfg: TrainConfig,
    weights: dict[str, list[np.ndarray]],
    labels: list[str],
    metrics: dict[str, Any],
    report_dir: str,
) -> str:
    """Publish a float32, non-distributed copy of the model (no mirrored variables, no float16 compute)."""
    import tf_keras as keras
    from fovea.trainer.export import export_model
    from fovea.trainer.model import build_model

    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        clone, _ = build_model(dataclasses.replace(cfg, weights="none"), len(labels))
        set_layer_weights(clone, weights)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    exported_metrics = {k: v for k, v in metrics.items() if k not in ("history", "skipped_files")}
    exported_metrics["skipped_files"] = len(metrics["skipped_files"])
    return export_model(
        clone,
        models_dir=cfg.models,
        name=cfg.name,
        labels=labels,
        input_size=(cfg.input_size, cfg.input_size),
        backbone=cfg.backbone,
        metrics=exported_metrics,
        config=cfg.to_dict(),
        report_dir=report_dir,
    )


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


def _save_weights(model: Any, path: Path) -> None:
    arrays = {
        f"{key}#{i}": value
        for key, values in get_layer_weights(model).items()
        for i, value in enumerate(values)
    }
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)  # a kill mid-write never leaves a half file under the real name


def _load_weights(model: Any, path: Path) -> None:
    with np.load(path) as f:
        weights: dict[str, list[np.ndarray]] = {}
        for key in sorted(f.files, key=lambda k: (k.rsplit("#", 1)[0], int(k.rsplit("#", 1)[1]))):
            weights.setdefault(key.rsplit("#", 1)[0], []).append(f[key])
    set_layer_weights(model, weights)


def unfreeze_top(base: Any, num_layers: int) -> list[str]:
    from fovea.trainer.model import unfreeze_top as _unfreeze

    return _unfreeze(base, num_layers)
