"""Two-phase transfer learning, resumable, single- or multi-worker, ending in a published version.

Phase 1 trains the new head on a frozen base (Adam, --learning-rate). Phase 2 unfreezes the top of the
base, BatchNorm excepted, and recompiles at --fine-tune-learning-rate. Each phase has its own
EarlyStopping(val_loss, restore_best_weights) and ReduceLROnPlateau, a BackupAndRestore folder so a
killed job resumes at its next epoch, and a CSV history. When a phase ends its weights and a marker
are saved, so a restart skips the phases already done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import posixpath
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fovea.trainer import data as data_mod
from fovea.trainer import disk_space
from fovea.trainer.config import TrainConfig
from fovea.trainer.distribute import make_strategy, task_info, tf_config_from_indexed_job, use_mixed_precision
from fovea.trainer.layer_weights import get_layer_weights, load_weights, save_weights, set_layer_weights
from fovea.trainer.model_lock import model_lock
from fovea.trainer.parent import is_published_version
from fovea.trainer.results import TrainMetrics
from fovea.trainer.resume import (
    RunBackup,
    best_epoch_of,
    keep_best,
    read_history,
    restore_best,
    write_text_atomic,
)


@dataclasses.dataclass
class TrainResult:
    """What a run produced. version_path is None on workers other than the chief."""

    version_path: str | None
    metrics: TrainMetrics
    model: Any
    dataset: data_mod.Dataset
    config: TrainConfig
    is_chief: bool

    @property
    def report_index(self) -> str | None:
        """The published report page (report/index.html), None on other workers than the chief."""
        return posixpath.join(self.version_path, "report", "index.html") if self.version_path else None


def keras_verbose(verbose: int, stream: Any = None) -> int:
    """--verbose 1 (progress bars) becomes 2 (one line per epoch) when stdout is not a terminal: a bar
    redrawn into a file or a pipe is one line of every intermediate state (90 KB per epoch)."""
    stream = sys.stdout if stream is None else stream
    if verbose == 1 and not (hasattr(stream, "isatty") and stream.isatty()):
        return 2
    return verbose


def _callbacks(s: _Session, phase: int) -> list[Any]:
    import tf_keras as keras

    cfg, backup = s.cfg, s.backup
    # New instances per phase: EarlyStopping and ReduceLROnPlateau keep state between fits otherwise.
    # keep_best first: an epoch BackupAndRestore calls done must have its best weights on disk.
    return [
        keep_best(backup, phase, s.model),
        keras.callbacks.BackupAndRestore(backup.checkpoints(phase)),
        # Silent: fovea says which epoch it keeps (_restore_phase_best), and when a phase stopped early.
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=cfg.patience, restore_best_weights=True, verbose=0
        ),
        # Silent too: Keras announces a lower rate after the epoch that triggered it, which reads as
        # if that epoch used it; _learning_rate_notice says so as the epoch that uses it begins.
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=cfg.reduce_lr_factor, patience=cfg.reduce_lr_patience, verbose=0
        ),
        _learning_rate_notice(s),
        keras.callbacks.CSVLogger(str(backup.history(phase)), append=True),
        *_tensorboard_callbacks(s),
    ]


def _learning_rate_notice(s: _Session) -> Any:
    """Logs "epoch N: learning rate lowered to X" when epoch N begins with a lower rate than the last."""
    import tf_keras as keras

    class LearningRateNotice(keras.callbacks.Callback):
        last: float | None = None

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            rate = float(keras.backend.get_value(self.model.optimizer.learning_rate))
            if self.last is not None and rate < self.last:
                s.log(
                    f"epoch {epoch + 1}: learning rate lowered to {rate:.3g} (val_loss had not improved "
                    f"for {s.cfg.reduce_lr_patience} {_plural(s.cfg.reduce_lr_patience, 'epoch')})"
                )
            self.last = rate

    return LearningRateNotice()


def _plural(count: int, word: str) -> str:
    return word if count == 1 else word + "s"


def _tensorboard_callbacks(s: _Session) -> list[Any]:
    """Scalars per epoch (loss, accuracy, the learning rate) when --tensorboard is given."""
    if not s.tensorboard_dir:
        return []
    import tf_keras as keras

    class LearningRate(keras.callbacks.Callback):
        # Put the learning rate into the logs, so TensorBoard (next in the list) writes it as a scalar.
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if logs is not None:
                logs["learning_rate"] = float(keras.backend.get_value(self.model.optimizer.learning_rate))

    return [
        LearningRate(),
        keras.callbacks.TensorBoard(log_dir=s.tensorboard_dir, histogram_freq=0, write_graph=False),
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
    """Train, evaluate, report and (on the chief) publish. Raises DataError/WeightsError/ValueError,
    ModelBusyError when another trainer holds the model's lock, and DiskFullError when the run would
    not fit on its disks or a disk filled up while it ran.

    on_event(event, model, base) is called at "built", "phase1_end", "phase2_end" and "published"
    (tests inspect the weights there).
    """
    cfg.validate()
    cfg = cfg.resolved()
    tf_config_from_indexed_job()
    # Only the chief publishes, so only the chief locks: the workers of one run share the model.
    lock = model_lock(cfg.models, cfg.name, log) if task_info()[2] else contextlib.nullcontext()
    with lock:
        backups: list[RunBackup] = []
        try:
            return _run(cfg, log, on_event or (lambda event, model, base: None), backups)
        except Exception as exc:
            if isinstance(exc, disk_space.DiskFullError) or not disk_space.is_disk_full(exc):
                raise
            # The disk filled up anyway (another writer, a bad estimate): one line, and no partial
            # backup left to fill it (export_model removes its own .tmp-* folder).
            removed = [path for b in backups if (path := b.discard())]
            model_root = posixpath.join(cfg.models, cfg.name)
            raise disk_space.filled(exc, model_root, cfg.backup_dir, removed) from None


def _run(
    cfg: TrainConfig,
    log: Callable[[str], None],
    notify: Callable[[str, Any, Any], None],
    backups: list[RunBackup],
) -> TrainResult:
    started = time.monotonic()
    model_root = posixpath.join(cfg.models, cfg.name)
    if task_info()[2] and "://" not in cfg.models:
        from fovea.trainer.export import remove_stale_temporaries

        # Under the model's lock: a .tmp-* folder no live exporter on this host writes is a killed
        # run's, wherever it ran.
        for entry in remove_stale_temporaries(model_root, model_locked=True):
            log(f"removed {posixpath.join(model_root, entry)}, left by a killed run")
    # Before the data is read and the model built, so a run that cannot fit fails in seconds.
    disk_space.check(
        model_root=model_root,
        backup_dir=cfg.backup_dir,
        params=disk_space.BACKBONE_PARAMS[cfg.backbone],
        fine_tune=cfg.fine_tune_epochs > 0,
        reference=lambda: disk_space.reference_version_bytes(model_root, cfg.backbone, cfg.input_size),
        publishes=task_info()[2],
        log=log,
    )
    dataset = _load_data(cfg, log)

    import tf_keras as keras

    strategy = make_strategy(log)
    task = task_info()
    is_chief = task[2]
    if use_mixed_precision(cfg):
        keras.mixed_precision.set_global_policy("mixed_float16")
        log("mixed_float16 compute")

    replicas = strategy.num_replicas_in_sync
    stream = _stream_settings(cfg, dataset, replicas)
    train_ds = data_mod.make_stream(
        dataset.files["train"],
        dataset.targets["train"],
        training=True,
        repeat=cfg.steps_per_epoch > 0,
        **stream,
    )
    val_ds = data_mod.make_stream(dataset.files["val"], dataset.targets["val"], training=False, **stream)

    parent, parent_mode = "", ""
    with strategy.scope():
        model, base = _build_and_freeze(cfg, len(dataset.labels))
        if is_published_version(cfg.weights):
            from fovea.trainer.parent import load_parent

            parent, parent_mode = load_parent(model, cfg.weights, dataset.labels, cfg.backbone)
            log(f"starting from {parent}: {parent_mode}")
        _compile(model, cfg, cfg.learning_rate)
    notify("built", model, base)
    # Only now, so a run that fails on its data, weights or disk space leaves no backup folder behind.
    backup = RunBackup(cfg.backup_dir, task)
    backups.append(backup)
    backup.check_fingerprint(cfg, log)
    tensorboard_dir = ""
    if cfg.tensorboard:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        tensorboard_dir = posixpath.join(cfg.tensorboard, cfg.name, stamp)
        if is_chief:
            _tensorboard_images(tensorboard_dir, cfg, dataset)
        log(f"TensorBoard logs: tensorboard --logdir {posixpath.join(cfg.tensorboard, cfg.name)}")

    session = _Session(
        cfg=cfg, model=model, base=base, strategy=strategy, backup=backup, train_ds=train_ds, log=log,
        notify=notify, tensorboard_dir=tensorboard_dir, fit=dict(
            steps_per_epoch=cfg.steps_per_epoch or None, validation_data=val_ds, verbose=keras_verbose(cfg.verbose),
            class_weight=dataset.class_weights() if cfg.class_weights else None,
        ),
    )  # fmt: skip
    phase1_epochs, history1 = _phase1(session)
    history2, unfrozen = _phase2(session, phase1_epochs, history1)
    history = history1 + history2
    # Every worker reads the final weights: under MultiWorkerMirroredStrategy reading a BatchNorm
    # statistic is a collective op, so the chief cannot do it alone after the others have exited.
    final_weights = get_layer_weights(model)

    from fovea.trainer import chance, evaluate, report

    test_ds = data_mod.make_stream(dataset.files["test"], dataset.targets["test"], training=False, **stream)
    evaluation, probabilities, truth = evaluate.evaluate(model, test_ds, dataset.labels)
    train_seconds = time.monotonic() - started
    log(f"test accuracy {evaluation.accuracy:.4f} on {evaluation.support} images")
    warnings = chance.warnings(
        accuracy=evaluation.accuracy,
        classes=len(dataset.labels),
        test_images=evaluation.support,
        train_images=dataset.counts()["train"],
        weights=cfg.weights,
    )
    from fovea.trainer import calibration

    val_probabilities, val_truth = evaluate.predict(model, val_ds)
    calibrated = calibration.calibrate_run(cfg, (val_probabilities, val_truth), (probabilities, truth), log)

    metrics = TrainMetrics(
        test_accuracy=evaluation.accuracy,
        test=evaluation,
        # Numbered from 1, as Keras prints epochs ("Epoch 22/30"), the console and the plot.
        best_epoch=None if best_epoch_of(history) is None else best_epoch_of(history) + 1,
        best_val_loss=min((r["val_loss"] for r in history if "val_loss" in r), default=None),
        fine_tune_start_epoch=phase1_epochs if cfg.fine_tune_epochs > 0 else None,
        phase1_epochs=phase1_epochs,
        phase2_epochs=len(history2),
        unfrozen_layers=len(unfrozen),
        history=history,
        images=dataset.counts(),
        layout=dataset.layout,
        skipped_files=dataset.skipped,
        replicas=replicas,
        train_seconds=round(train_seconds, 1),
        augment=cfg.augment,
        augmentation=dataclasses.asdict(cfg.augmentation()),
        parent=parent,
        parent_mode=parent_mode,
        run_id=backup.run_id(),
        backbone=cfg.backbone,
        input_size=cfg.input_size,
        weights=chance.weights_text(cfg.weights, parent),
        warnings=warnings,
    )

    version_path = None
    if is_chief:
        # Killed after publishing but before the backup was removed: the restart finds its own version
        # (fovea.json names the run) instead of publishing the same weights again.
        version_path = _published_by_this_run(cfg, metrics.run_id)
        if version_path:
            log(f"this run already published {version_path}: not publishing it again")
        else:
            from fovea.trainer import gate

            decision = gate.run_gate(
                cfg,
                dataset.labels,
                evaluation,
                dataset.files["test"],
                np.asarray(dataset.targets["test"]),
                log,
            )
            metrics.gate = decision.to_dict() if decision else None
            with tempfile.TemporaryDirectory(prefix="fovea-report-") as report_dir:
                report.write_report(
                    report_dir,
                    metrics=metrics,
                    labels=dataset.labels,
                    config=cfg,
                    samples=report.Samples(
                        train_files=dataset.files["train"],
                        train_targets=dataset.targets["train"],
                        test_files=dataset.files["test"],
                        test_probabilities=calibrated.test_probabilities,
                        test_truth=truth,
                    ),
                    quality=_quality(cfg, dataset, model, calibrated, (probabilities, truth), log),
                )
                if decision is not None and not decision.passed:
                    kept = gate.keep_rejected(cfg.models, cfg.name, report_dir, decision)
                    backup.remove()  # a rejected run is over: its rerun trains anew
                    raise gate.GateRejected(f"not published: {decision.reason}; report in {kept}")
                version_path = _export(
                    cfg, final_weights, dataset.labels, metrics, report_dir, calibrated.summary
                )
            log(f"published {version_path}")
            notify("published", model, base)
    # A finished run leaves no backup behind, so the next run of the same command trains anew.
    backup.remove()
    return TrainResult(version_path, metrics, model, dataset, cfg, is_chief)


def _quality(
    cfg: TrainConfig,
    dataset: data_mod.Dataset,
    model: Any,
    calibrated: Any,
    test_raw: tuple[np.ndarray, np.ndarray],
    log: Callable[[str], None],
) -> Any:
    """What the report's calibration and data-quality sections show (report_quality.py)."""
    from fovea.trainer import audit, report_quality

    findings = audit.run_audit(cfg, dataset, model, log) if audit.wanted(cfg, dataset) else None
    return report_quality.Quality(calibrated=calibrated, test_raw=test_raw, audit=findings)


def _published_by_this_run(cfg: TrainConfig, run_id: str) -> str | None:
    from fovea.trainer.export import version_of_run

    return version_of_run(posixpath.join(cfg.models, cfg.name), run_id)


def _tensorboard_images(log_dir: str, cfg: TrainConfig, dataset: data_mod.Dataset) -> None:
    """A few training images with their augmented draws, as TensorBoard shows them under IMAGES."""
    import tensorflow as tf
    from fovea.trainer.report import augmented_draws

    originals, draws = augmented_draws(cfg, dataset.files["train"][:4], draws=3)
    writer = tf.summary.create_file_writer(posixpath.join(log_dir, "images"))
    with writer.as_default():
        tf.summary.image("training images", originals, step=0, max_outputs=4)
        for i in range(draws.shape[1]):
            tf.summary.image(f"augmented ({cfg.augment}) draw {i + 1}", draws[:, i], step=0, max_outputs=4)
    writer.close()


@dataclasses.dataclass
class _Session:
    """What both phases share."""

    cfg: TrainConfig
    model: Any
    base: Any
    strategy: Any
    backup: RunBackup
    train_ds: Any
    fit: dict[str, Any]
    log: Callable[[str], None]
    notify: Callable[[str, Any, Any], None]
    tensorboard_dir: str = ""


def _load_data(cfg: TrainConfig, log: Callable[[str], None]) -> data_mod.Dataset:
    if cfg.demo_data_if_empty and not data_mod.has_images(cfg.data):
        from fovea.trainer.demo_data import generate

        counts = generate(cfg.data, seed=cfg.seed)
        log(
            f"{cfg.data} held no images: generated demo data ({len(counts)} classes x {max(counts.values())})"
        )
    dataset = data_mod.load_dataset(
        cfg.data, val_split=cfg.val_split, test_split=cfg.test_split, seed=cfg.seed
    )
    if cfg.exclude:
        from fovea.trainer.audit import exclude_listed

        dataset, removed = exclude_listed(dataset, cfg.exclude)
        log(f"--exclude {cfg.exclude}: left out {removed} listed images")
    counts = {split: sum(c.values()) for split, c in dataset.counts().items()}
    log(
        f"{len(dataset.labels)} classes ({', '.join(dataset.labels)}); images: train {counts['train']}, "
        f"val {counts['val']}, test {counts['test']}; skipped {len(dataset.skipped)} unreadable files"
    )
    for item in dataset.skipped[:20]:
        log(f"  skipped {item['path']}: {item['reason']}")
    return dataset


def _stream_settings(cfg: TrainConfig, dataset: data_mod.Dataset, replicas: int) -> dict[str, Any]:
    total = sum(len(files) for files in dataset.files.values())
    cache = cfg.cache == "memory" or (
        cfg.cache == "auto" and data_mod.fits_in_cache(total, cfg.input_size, cfg.cache_limit_mb)
    )
    return dict(
        num_classes=len(dataset.labels), input_size=cfg.input_size, seed=cfg.seed, cache=cache,
        batch_size=cfg.batch_size * replicas,
    )  # fmt: skip


def _phase1(s: _Session) -> tuple[int, list[dict[str, float]]]:
    """The head on a frozen base; skipped when a restarted job finds it done. Returns (epochs, history)."""
    cfg, backup = s.cfg, s.backup
    if backup.marker(1).is_file():
        phase1 = json.loads(backup.marker(1).read_text())
        load_weights(s.model, backup.weights(1))
        s.log(
            f"phase 1 already done ({phase1['epochs']} epochs): loaded its weights from {backup.weights(1)}"
        )
    else:
        s.log(
            f"phase 1: {_phase1_plan(cfg)} (up to {cfg.epochs} {_plural(cfg.epochs, 'epoch')}, lr {cfg.learning_rate:g})"
        )
        s.model.fit(s.train_ds, epochs=cfg.epochs, callbacks=_callbacks(s, 1), **s.fit)
        history = read_history(backup.history(1))
        _say_stopped_early(s, 1, len(history), cfg.epochs)
        best = _restore_phase_best(s, 1)
        if best is not None:
            s.log(f"phase 1: kept the weights of its best epoch, {_epoch_text(best)}")
        phase1 = {"epochs": len(history), "best_epoch": best_epoch_of(history)}
        save_weights(s.model, backup.weights(1))
        write_text_atomic(backup.marker(1), json.dumps(phase1))
    s.notify("phase1_end", s.model, s.base)
    return int(phase1["epochs"]), read_history(backup.history(1))


def _phase2(
    s: _Session, phase1_epochs: int, history1: list[dict[str, float]]
) -> tuple[list[dict[str, float]], list[str]]:
    """Fine-tune the top of the base, BatchNorm kept in inference mode. Returns (history, unfrozen layers)."""
    cfg, backup = s.cfg, s.backup
    if cfg.fine_tune_epochs <= 0:
        return [], []
    from fovea.trainer.model import unfreeze_top

    with s.strategy.scope():
        unfrozen = unfreeze_top(s.base, cfg.fine_tune_layers)
        _compile(s.model, cfg, cfg.fine_tune_learning_rate)
    if backup.marker(2).is_file():
        load_weights(s.model, backup.weights(2))
        s.log(f"phase 2 already done: loaded its weights from {backup.weights(2)}")
        return read_history(backup.history(2)), unfrozen
    what = (
        f"training the whole network: the head and all {len(unfrozen)} layers of the base (BatchNorm excepted)"
        if cfg.fine_tune_layers == 0
        else f"fine-tuning the top {len(unfrozen)} layers of the base (BatchNorm excepted) with the head"
    )
    epochs = cfg.fine_tune_epochs
    s.log(f"phase 2: {what} (up to {epochs} {_plural(epochs, 'epoch')}, lr {cfg.fine_tune_learning_rate:g})")
    s.model.fit(
        s.train_ds,
        initial_epoch=phase1_epochs,
        epochs=phase1_epochs + cfg.fine_tune_epochs,
        callbacks=_callbacks(s, 2),
        **s.fit,
    )
    history = read_history(backup.history(2))
    _say_stopped_early(s, 2, len(history), cfg.fine_tune_epochs)
    best = _restore_phase_best(s, 2)
    s.notify("phase2_end", s.model, s.base)
    best1 = min((r["val_loss"] for r in history1 if "val_loss" in r), default=float("inf"))
    best2 = min((r["val_loss"] for r in history if "val_loss" in r), default=float("inf"))
    # One line saying which weights the run keeps: phase 2's best epoch, or phase 1's when fine-tuning
    # never beat the head alone.
    best_text = "" if best is None else f", {_epoch_text(best)},"
    if best2 > best1:
        load_weights(s.model, backup.weights(1))
        s.log(
            f"phase 2: its best epoch{best_text} did not beat phase 1's best val_loss ({best1:.4f}): "
            "keeping phase 1's weights"
        )
    elif best is not None:
        s.log(
            f"phase 2: kept the weights of its best epoch, {_epoch_text(best)}, better than phase 1's {best1:.4f}"
        )
    save_weights(s.model, backup.weights(2))
    write_text_atomic(backup.marker(2), json.dumps({"epochs": len(history)}))
    return history, unfrozen


def _restore_phase_best(s: _Session, phase: int) -> dict[str, float] | None:
    """EarlyStopping restored the best epoch since the last (re)start; this is the best of the phase.
    Returns its history row (None when nothing was recorded); the caller says what it keeps."""
    return restore_best(s.backup, phase, s.model)


def _epoch_text(best: dict[str, float]) -> str:
    # Epochs are numbered across both phases from 1, as Keras prints them and the report plots them.
    return f"{int(best['epoch']) + 1} (val_loss {best['val_loss']:.4f})"


def _say_stopped_early(s: _Session, phase: int, ran: int, planned: int) -> None:
    if 0 < ran < planned:
        s.log(
            f"phase {phase}: stopped early after {ran} of {planned} epochs: val_loss had not improved for "
            f"{s.cfg.patience} {_plural(s.cfg.patience, 'epoch')}"
        )


def _phase1_plan(cfg: TrainConfig) -> str:
    """What phase 1 does, in words a user can check against the flags."""
    if cfg.weights.lower() != "none":
        return f"training the new head on a frozen {cfg.backbone}"
    # A random base stays frozen here on purpose: a few epochs give the new head a start on random
    # features before phase 2 trains everything, which keeps the head's first, large gradients out of
    # the base. Said plainly, since "frozen" alone suggests pretrained features.
    then = (
        "phase 2 then trains the whole network"
        if cfg.fine_tune_epochs > 0 and cfg.fine_tune_layers == 0
        else "phase 2 then trains the top of the base"
        if cfg.fine_tune_epochs > 0
        else "with --fine-tune-epochs 0 the base keeps its random weights and only the head learns"
    )
    return (
        f"training the new head on a frozen, randomly initialised {cfg.backbone} (--weights none): its "
        f"features are random, so this only gives the head a start; {then}"
    )


def _build_and_freeze(cfg: TrainConfig, num_classes: int) -> tuple[Any, Any]:
    from fovea.trainer.model import build_model, freeze_base

    model, base = build_model(cfg, num_classes)
    freeze_base(base)
    return model, base


def _export(
    cfg: TrainConfig,
    weights: dict[str, list[np.ndarray]],
    labels: list[str],
    metrics: TrainMetrics,
    report_dir: str,
    calibration: dict[str, Any] | None = None,
) -> str:
    """Publish a float32, non-distributed copy of the model (no mirrored variables, no float16 compute)."""
    import tf_keras as keras
    from fovea.trainer.export import export_model
    from fovea.trainer.model import build_model

    # The clone only receives weights: build it without loading any (no download, no parent).
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        clone, _ = build_model(dataclasses.replace(cfg, weights="none"), len(labels))
        set_layer_weights(clone, weights)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    return export_model(
        clone,
        models_dir=cfg.models,
        name=cfg.name,
        labels=labels,
        input_size=(cfg.input_size, cfg.input_size),
        backbone=cfg.backbone,
        metrics=metrics.exported(),
        config=cfg.to_dict(),
        report_dir=report_dir,
        parent=metrics.parent,
        calibration=calibration,
    )
