"""Trainer data and config: layouts, seeded stratified split, bad files, refusals, config precedence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the trainer tests need the trainer extra")

from conftest import subprocess_env
from fovea.trainer import data
from fovea.trainer.config import TrainConfig, load_file, make_config
from fovea.trainer.demo_data import CLASSES, generate
from fovea.trainer.evaluate import scores


def _corrupt_files(folder: Path) -> list[Path]:
    """A truncated PNG, text named .jpg, an empty .png and a non-image extension."""
    good = next(folder.glob("*.png")).read_bytes()
    files = {
        folder / "truncated.png": good[: len(good) // 2],
        folder / "text.jpg": b"this is not an image at all",
        folder / "empty.png": b"",
        folder / "notes.txt": b"hello",
    }
    for path, content in files.items():
        path.write_bytes(content)
    return list(files)


def test_demo_data_is_seeded_and_has_the_classes(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", classes=3, per_class=4, size=32, seed=7)
    generate(tmp_path / "b", classes=3, per_class=4, size=32, seed=7)
    assert a == {label: 4 for label in list(CLASSES)[:3]}
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files_a) == 12
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    with pytest.raises(ValueError):
        generate(tmp_path / "c", classes=1)


def test_split_is_stratified_seeded_80_10_10(tmp_path: Path) -> None:
    generate(tmp_path, classes=3, per_class=20, size=16, seed=0)
    ds = data.load_dataset(tmp_path, seed=3)
    assert ds.labels == sorted(list(CLASSES)[:3])
    assert ds.counts() == {
        "train": dict.fromkeys(ds.labels, 16),
        "val": dict.fromkeys(ds.labels, 2),
        "test": dict.fromkeys(ds.labels, 2),
    }
    all_files = [f for split in data.SPLITS for f in ds.files[split]]
    assert len(all_files) == len(set(all_files)) == 60
    again = data.load_dataset(tmp_path, seed=3)
    assert again.files == ds.files
    other = data.load_dataset(tmp_path, seed=4)
    assert other.files["test"] != ds.files["test"]
    assert ds.class_weights() == pytest.approx(dict.fromkeys(range(3), 1.0))


def test_presplit_layout_and_class_weights(tmp_path: Path) -> None:
    generate(tmp_path / "train", classes=2, per_class=6, size=16, seed=0)
    for extra in (tmp_path / "train" / "checks").glob("*_000[0-3].png"):
        extra.unlink()  # imbalance: 6 stripes, 2 checks
    generate(tmp_path / "val", classes=2, per_class=1, size=16, seed=1)
    generate(tmp_path / "test", classes=2, per_class=2, size=16, seed=2)
    ds = data.load_dataset(tmp_path)
    assert ds.layout.startswith("DATA/{train")
    counts = ds.counts()
    assert counts["train"] == {"checks": 2, "dots": 6}
    assert counts["val"] == {"checks": 1, "dots": 1} and counts["test"] == {"checks": 2, "dots": 2}
    assert ds.class_weights() == pytest.approx({0: 8 / 4, 1: 8 / 12})


def test_corrupt_and_non_image_files_are_skipped_and_listed(tmp_path: Path) -> None:
    generate(tmp_path, classes=2, per_class=10, size=16, seed=0)
    bad = _corrupt_files(tmp_path / "dots" if (tmp_path / "dots").exists() else tmp_path / "checks")
    ds = data.load_dataset(tmp_path)
    skipped = {Path(s["path"]).name: s["reason"] for s in ds.skipped}
    assert set(skipped) == {p.name for p in bad}
    assert "extension" in skipped["notes.txt"]
    assert all(Path(f).name not in skipped for split in data.SPLITS for f in ds.files[split])
    assert sum(len(ds.files[s]) for s in data.SPLITS) == 20


def test_stream_decodes_resizes_and_one_hots(tmp_path: Path) -> None:
    generate(tmp_path, classes=2, per_class=10, size=20, seed=0)
    ds = data.load_dataset(tmp_path)
    files = ds.files["train"]
    stream = data.make_stream(
        files,
        ds.targets["train"],
        num_classes=2,
        input_size=32,
        batch_size=4,
        training=False,
        seed=0,
        cache=True,
    )
    images, labels = next(iter(stream))
    assert images.shape == (4, 32, 32, 3) and images.dtype.name == "float32"
    assert float(images.numpy().max()) <= 255.0 and labels.shape == (4, 2)
    np.testing.assert_array_equal(labels.numpy().argmax(1), ds.targets["train"][:4])


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("one_class", "at least 2 class folders"),
        ("empty_class", "class 'dots' has no readable images"),
        ("only_corrupt_class", "class 'dots' has no readable images"),
        ("empty_split", "the test split is empty"),
        ("presplit_empty_val", "the val split is empty"),
        ("missing", "data folder not found"),
    ],
)
def test_refusals_say_what_to_fix(tmp_path: Path, setup: str, message: str) -> None:
    root = tmp_path / "data"
    if setup == "one_class":
        generate(root, classes=2, per_class=3, size=16)
        for f in (root / "dots").iterdir():
            f.unlink()
        (root / "dots").rmdir()
    elif setup == "empty_class":
        generate(root, classes=2, per_class=3, size=16)
        for f in (root / "dots").iterdir():
            f.unlink()
    elif setup == "only_corrupt_class":
        generate(root, classes=2, per_class=3, size=16)
        for f in (root / "dots").iterdir():
            f.write_bytes(b"broken")
    elif setup == "empty_split":
        generate(root, classes=2, per_class=2, size=16)  # 2 images per class: train + val, no test
    elif setup == "presplit_empty_val":
        generate(root / "train", classes=2, per_class=3, size=16)
        generate(root / "test", classes=2, per_class=1, size=16)
        for label in ("checks", "dots"):
            (root / "val" / label).mkdir(parents=True)
    with pytest.raises(data.DataError, match=message):
        data.load_dataset(root)


def test_scores() -> None:
    truth = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0])
    out = scores(truth, predicted, ["a", "b", "c"])
    assert out.accuracy == pytest.approx(4 / 6)
    assert out.confusion_matrix == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert out.per_class["b"] == {
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": 0.8,
        "support": 2,
    }


def test_config_file_then_flags(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data: /d\nmodels: /m\nepochs: 7\ninput-size: 96\naugment: false\n")
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"data": "/d", "models": "/m", "batch_size": 8}))
    cfg = make_config(load_file(str(yaml_file)), {"epochs": "3", "backbone": None})
    # augment: false is the boolean of earlier releases: it reads as the 'none' preset.
    assert (cfg.epochs, cfg.input_size, cfg.augment, cfg.backbone) == (3, 96, "none", "resnet50")
    assert make_config(load_file(str(json_file)), {}).batch_size == 8
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": "/d", "epoks": 3}))
    with pytest.raises(ValueError, match="unknown option 'epoks'"):
        load_file(str(bad))
    resolved = TrainConfig(data="/d", models="/m", weights="none").resolved()
    assert (resolved.fine_tune_layers, resolved.fine_tune_learning_rate) == (0, 3e-4)
    assert (resolved.epochs, resolved.fine_tune_epochs, resolved.batch_size) == (3, 20, 16)
    resolved = TrainConfig(data="/d", models="/m").resolved()
    assert (resolved.fine_tune_layers, resolved.fine_tune_learning_rate) == (30, 1e-5)
    assert (resolved.epochs, resolved.fine_tune_epochs, resolved.batch_size) == (20, 10, 32)
    assert resolved.backup_dir == "/m/classifier/.backup"


def test_config_auto_is_none_and_booleans_are_strict(tmp_path: Path) -> None:
    assert TrainConfig().epochs is None and TrainConfig().batch_size is None
    # "auto" from a flag or a file, and null in a file, are None; a flag wins over the file either way.
    assert make_config({"data": "/d", "models": "/m", "epochs": 5}, {"epochs": "auto"}).epochs is None
    assert make_config({"data": "/d", "models": "/m", "epochs": None}, {}).epochs is None
    assert make_config({"data": "/d", "models": "/m", "epochs": "auto"}, {"epochs": "4"}).epochs == 4
    for raw in ("true", "Yes", "1", "on", True):
        assert make_config({"data": "/d", "models": "/m", "class_weights": raw}, {}).class_weights is True
    for raw in ("false", "no", "0", "OFF", False):
        assert make_config({"data": "/d", "models": "/m", "class_weights": raw}, {}).class_weights is False
    for raw in ("flase", "maybe", "", 2):
        with pytest.raises(ValueError, match="class-weights: cannot read"):
            make_config({"data": "/d", "models": "/m", "class_weights": raw}, {})
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        make_config({"data": "/d", "models": "/m"}, {"epochs": "-1"})  # -1 no longer means auto
    with pytest.raises(ValueError, match="epochs: cannot read"):
        make_config({"data": "/d", "models": "/m"}, {"epochs": "2.5"})
    with pytest.raises(ValueError, match="--backbone must be one of resnet50, vgg16, vgg19"):
        make_config({"data": "/d", "models": "/m", "backbone": "vgg11"}, {})


def test_augmentation_presets_and_overrides() -> None:
    from fovea.trainer.config import AUGMENT_PRESETS
    from fovea.trainer.model import augmentation_layers

    photo = TrainConfig().augmentation()
    # 'photo' is the seed tutorial's recipe, the values of every earlier release.
    assert (photo.flip, photo.rotation, photo.shift, photo.zoom, photo.brightness, photo.contrast) == (
        True, 30.0, 0.2, 0.2, 0.2, 0.2,
    )  # fmt: skip
    upright = TrainConfig(augment="upright").augmentation()
    assert not upright.flip and upright.rotation == 0 and upright.shift > 0
    assert not AUGMENT_PRESETS["none"].active
    assert TrainConfig(augment="upright", rotation=5.0).augmentation().rotation == 5.0
    resolved = TrainConfig(data="/d", models="/m", augment="upright", zoom=0.3).resolved()
    assert (resolved.flip, resolved.rotation, resolved.zoom) == (False, 0.0, 0.3)

    names = {layer.name for layer in augmentation_layers(photo, seed=0)}
    assert {"aug_flip", "aug_rotation", "aug_zoom", "aug_shift", "aug_brightness", "aug_contrast"} <= names
    names = {layer.name for layer in augmentation_layers(upright, seed=0)}
    assert "aug_flip" not in names and "aug_rotation" not in names and "aug_shift" in names
    assert augmentation_layers(AUGMENT_PRESETS["none"], seed=0) == []


def test_every_option_is_in_help_and_errors_are_one_line(tmp_path: Path) -> None:
    import dataclasses

    out = subprocess.run(
        [sys.executable, "-m", "fovea.cli", "train", "--help"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in out.stdout
    assert "--config" in out.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "fovea.cli",
            "train",
            "--data",
            str(tmp_path / "nope"),
            "--models",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("fovea train: error: data folder not found")
    assert "Traceback" not in bad.stderr


def test_tf_config_from_indexed_job(monkeypatch: pytest.MonkeyPatch) -> None:
    from fovea.trainer.distribute import task_info, tf_config_from_indexed_job

    monkeypatch.setenv("TF_CONFIG", "")  # unset for the code; restored (to absent) after the test
    monkeypatch.setenv("FOVEA_WORKER_HOSTS", "w-0.svc:2222, w-1.svc:2222")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    tf_config_from_indexed_job()
    conf = json.loads(os.environ["TF_CONFIG"])
    assert conf == {
        "cluster": {"worker": ["w-0.svc:2222", "w-1.svc:2222"]},
        "task": {"type": "worker", "index": 1},
    }
    assert task_info() == ("worker", 1, False)
