"""Trainer behaviour on tiny runs (32 px, few images): weights, phases, early stopping, bad files, report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the trainer tests need the trainer extra")

from fovea.trainer import data as data_mod
from fovea.trainer.backbones import WeightsError, build_base
from fovea.trainer.config import TrainConfig
from fovea.trainer.demo_data import generate
from fovea.trainer.train import run


def _perturbed_base_h5(
    path: Path, name: str = "resnet50", size: int = 32
) -> dict[tuple[str, int], np.ndarray]:
    """Save a base whose every weight (BatchNorm statistics included) was perturbed; return the values."""
    base = build_base(name, size, "none")
    rng = np.random.default_rng(1)
    for layer in base.layers:
        for w in layer.weights:
            value = w.numpy()
            if "moving_variance" in w.name:
                w.assign(value * rng.uniform(0.5, 1.5, value.shape).astype(value.dtype))
            else:
                w.assign(value + rng.normal(0, 0.01, value.shape).astype(value.dtype))
    base.save_weights(str(path))
    return _weights(base)


def _weights(base) -> dict[tuple[str, int], np.ndarray]:
    return {(layer.name, i): w.numpy().copy() for layer in base.layers for i, w in enumerate(layer.weights)}


def test_imagenet_offline_names_the_alternatives(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A fresh cache folder, so weights cached on this machine cannot hide the failure.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))

    def no_network(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- offline")

    # The real loading code runs; only the download is made to fail, as it does without network.
    monkeypatch.setattr("tf_keras.src.applications.resnet.data_utils.get_file", no_network)
    with pytest.raises(WeightsError) as err:
        build_base("resnet50", 32, "imagenet")
    message = str(err.value)
    assert "--weights PATH" in message and "--weights none" in message and "URL fetch failure" in message


def test_local_h5_loads_exactly_into_the_base(tmp_path: Path) -> None:
    expected = _perturbed_base_h5(tmp_path / "base.h5")
    loaded = _weights(build_base("resnet50", 32, str(tmp_path / "base.h5")))
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert np.array_equal(loaded[key], value), key
    with pytest.raises(WeightsError, match="does not fit the vgg16 base"):
        build_base("vgg16", 32, str(tmp_path / "base.h5"))
    with pytest.raises(WeightsError, match="no such file"):
        build_base("resnet50", 32, str(tmp_path / "missing.h5"))


def test_phase1_freezes_the_base_and_phase2_trains_only_the_unfrozen_top(tmp_path: Path) -> None:
    """Also: corrupt files are skipped and listed in the published report."""
    data_dir = tmp_path / "data"
    generate(data_dir, classes=3, per_class=10, size=32, seed=0)
    (data_dir / "checks" / "broken.png").write_bytes(
        (data_dir / "checks" / "checks_0000.png").read_bytes()[:60]
    )
    (data_dir / "dots" / "fake.jpg").write_bytes(b"not a jpeg")
    perturbed = _perturbed_base_h5(tmp_path / "base.h5")

    snapshots: dict[str, dict] = {}
    unfrozen: set[str] = set()

    def on_event(event: str, model, base) -> None:
        snapshots[event] = _weights(base)
        if event == "phase2_end":
            unfrozen.update(
                layer.name for layer in base.layers if layer.trainable and layer.trainable_weights
            )

    cfg = TrainConfig(
        data=str(data_dir),
        models=str(tmp_path / "models"),
        name="phases",
        weights=str(tmp_path / "base.h5"),
        input_size=32,
        epochs=1,
        fine_tune_epochs=1,
        fine_tune_layers=12,
        learning_rate=1e-2,
        fine_tune_learning_rate=1e-2,
        batch_size=8,
        verbose=0,
    )
    result = run(cfg, log=lambda msg: None, on_event=on_event)

    built, after1, after2 = snapshots["built"], snapshots["phase1_end"], snapshots["phase2_end"]
    for key, value in perturbed.items():
        assert np.array_equal(built[key], value), f"the .h5 weights did not load exactly: {key}"
        assert np.array_equal(after1[key], value), f"phase 1 changed the frozen base: {key}"

    assert unfrozen and not any("_bn" in name for name in unfrozen), unfrozen
    changed = {key for key in after2 if not np.array_equal(after2[key], after1[key])}
    assert {layer for layer, _ in changed} == unfrozen, (
        "phase 2 changed a frozen layer or missed an unfrozen one"
    )
    assert all("moving" not in str(key) for key in changed)

    report = Path(result.version_path) / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert {Path(s["path"]).name for s in metrics["skipped_files"]} == {"broken.png", "fake.jpg"}
    assert (report / "training_curves.png").stat().st_size > 10_000
    assert (report / "confusion_matrix.png").stat().st_size > 10_000
    meta = json.loads((Path(result.version_path) / "assets.extra" / "fovea.json").read_text())
    assert meta["labels"] == ["checks", "dots", "grid"] and meta["input_size"] == {
        "height": 32,
        "width": 32,
    }
    assert meta["metrics"]["skipped_files"] == 2 and meta["config"]["weights"] == str(tmp_path / "base.h5")
    assert (
        json.loads((Path(result.version_path) / "assets.extra" / "train_config.json").read_text())["epochs"]
        == 1
    )
    assert not (tmp_path / "models" / "phases" / ".backup").exists(), "the backup outlived a finished run"


def test_early_stopping_ends_a_stalled_run_and_restores_the_best_weights(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    generate(tmp_path / "gen", classes=2, per_class=16, size=32, seed=0)
    # Random labels: nothing to learn, so val_loss stalls.
    rng = np.random.default_rng(0)
    files = sorted((tmp_path / "gen").rglob("*.png"))
    for i, path in enumerate(files):
        target = data_dir / ("a" if rng.random() < 0.5 else "b")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / f"{i}.png")

    cfg = TrainConfig(
        data=str(data_dir),
        models=str(tmp_path / "models"),
        name="stall",
        backbone="vgg16",
        weights="none",
        input_size=32,
        epochs=12,
        fine_tune_epochs=0,
        patience=1,
        reduce_lr_patience=100,
        learning_rate=1e-2,
        batch_size=8,
        verbose=0,
    )
    result = run(cfg, log=lambda msg: None)
    history = result.metrics.history
    assert len(history) < cfg.epochs, "early stopping did not end the stalled run"
    best = result.metrics.best_epoch  # numbered from 1, as Keras prints it
    assert best == len(history) - 1  # patience 1: the run stops one epoch after its best
    val = data_mod.make_stream(
        result.dataset.files["val"], result.dataset.targets["val"], num_classes=2, input_size=32,
        batch_size=8, training=False, seed=0, cache=False,
    )  # fmt: skip
    val_loss = result.model.evaluate(val, verbose=0)[0]
    assert val_loss == pytest.approx(history[best - 1]["val_loss"], rel=1e-4, abs=1e-5)
    assert val_loss != pytest.approx(history[-1]["val_loss"], rel=1e-4, abs=1e-5)
