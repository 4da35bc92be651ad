"""The training report (issue 14): the grids, curves that survive a spike, the one-page index.html
(rendered by a headless chromium), TensorBoard logs, and retraining from a published version."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the trainer tests need the trainer extra")

from _browser import render
from _models import tiny_train_config
from fovea.trainer import report
from fovea.trainer.config import TrainConfig
from fovea.trainer.demo_data import generate
from fovea.trainer.evaluate import scores
from fovea.trainer.results import TrainMetrics

LABELS = ["checks", "dots", "grid"]
# The demo run's shape: the loss jumps to 7.7 at the first epoch of fine-tuning.
SPIKY_HISTORY = [
    {"epoch": e, "loss": loss, "val_loss": val, "accuracy": acc, "val_accuracy": acc}
    for e, (loss, val, acc) in enumerate(
        [
            (1.2, 1.0, 0.4),
            (0.8, 0.7, 0.6),
            (0.6, 0.55, 0.7),
            (7.7, 2.1, 0.5),
            (0.5, 0.45, 0.8),
            (0.4, 0.42, 0.85),
        ]
    )
]


def _metrics(truth: np.ndarray, predicted: np.ndarray, **extra) -> TrainMetrics:
    evaluation = scores(truth, predicted, LABELS)
    values = dict(
        test_accuracy=evaluation.accuracy, test=evaluation, best_epoch=6, best_val_loss=0.42,
        fine_tune_start_epoch=3, phase1_epochs=3, phase2_epochs=3, unfrozen_layers=4,
        history=SPIKY_HISTORY, images={"train": {"checks": 4}, "val": {"checks": 1}, "test": {"checks": 1}},
        layout="DATA/<label>/*", skipped_files=[{"path": "/d/x.png", "reason": "truncated <b>"}],
        replicas=1, train_seconds=12.0, augment="upright",
        augmentation={"flip": False, "rotation": 0.0, "shift": 0.1, "zoom": 0.1, "brightness": 0.2, "contrast": 0.2},
    )  # fmt: skip
    values.update(extra)
    return TrainMetrics(**values)


def test_curves_cut_a_spike_and_mark_it(tmp_path: Path) -> None:
    clipped = report.plot_curves(SPIKY_HISTORY, tmp_path / "c.png", fine_tune_start=3, best_epoch=6)
    assert clipped == [("train", 4, 7.7)], clipped
    cut = report.spike_cut([v for r in SPIKY_HISTORY for v in (r["loss"], r["val_loss"])])
    assert cut is not None and 2.1 < cut < 7.7  # the rest, validation's 2.1 included, stays in view
    # A loss that simply falls from a high start is not cut.
    assert report.spike_cut([2.3, 1.4, 0.9, 0.6, 0.5, 0.45]) is None
    smooth = [{"epoch": e, "loss": v, "val_loss": v} for e, v in enumerate([2.3, 1.4, 0.9, 0.6])]
    assert report.plot_curves(smooth, tmp_path / "s.png", fine_tune_start=None, best_epoch=4) == []
    assert not report.wants_log_scale([v for r in SPIKY_HISTORY for v in (r["loss"], r["val_loss"])])


def test_a_loss_spanning_decades_is_drawn_on_a_log_axis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The demo run's shape: a random start near 5, a spike of 7.7 when fine-tuning starts, 0.04 at the best
    # epoch; the spike is not lone (the start is as high), so cutting it would not help, a log axis does.
    losses = [4.7, 3.8, 3.1, 7.7, 1.4, 1.2, 1.0, 0.7, 0.6, 0.3, 0.2, 0.1, 0.05]
    history = [{"epoch": e, "loss": v, "val_loss": v * 1.1} for e, v in enumerate(losses)]
    assert report.wants_log_scale([v for r in history for v in (r["loss"], r["val_loss"])])
    scales = []
    plt = report._pyplot()
    original = plt.Figure.savefig

    def capture(fig, path, **kwargs):
        scales.extend(ax.get_yscale() for ax in fig.axes)
        return original(fig, path, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", capture)
    assert report.plot_curves(history, tmp_path / "c.png", fine_tune_start=3, best_epoch=13) == []
    assert scales == ["log", "linear"]  # loss on a log axis, accuracy as it was


def test_mistakes_are_the_confident_wrong_answers_first() -> None:
    probabilities = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.4, 0.6, 0.0], [0.55, 0.45, 0.0]])
    truth = np.array([1, 1, 0, 0])
    chosen, wrong = report.pick_mistakes(probabilities, truth, count=3)
    # Wrong: 0 (0.9 sure of the wrong class), then 2 (0.6). Then the least sure right answer: 3 (0.55).
    assert (chosen, wrong) == ([0, 2, 3], 2)


def test_report_page_is_self_contained_and_renders(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate(data, classes=3, per_class=4, size=32, seed=0)
    files = sorted(str(p) for p in data.rglob("*.png"))
    targets = [LABELS.index(Path(f).parent.name) for f in files]
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(3), size=len(files)).astype(np.float32)
    truth = np.asarray(targets)
    metrics = _metrics(
        truth, probabilities.argmax(1), parent="shapes/3 (/m/shapes/3)", parent_mode="continue"
    )
    cfg = TrainConfig(data=str(data), models="/m", input_size=32, augment="upright")
    samples = report.Samples(files, targets, files, probabilities, truth)
    out = tmp_path / "report"
    index = report.write_report(out, metrics=metrics, labels=LABELS, config=cfg, samples=samples)

    assert index == out / "index.html"
    for name in (
        "training_curves.png",
        "confusion_matrix.png",
        "augmentation.png",
        "mistakes.png",
    ):
        assert (out / name).stat().st_size > 5_000, name
    page = index.read_text()
    sources = re.findall(r"src='([^']*)'", page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert base64.b64decode(sources[0].split(",", 1)[1]) == (out / "training_curves.png").read_bytes()
    assert not re.search(r"(?:src|href)=['\"]?(?:https?:)?//", page), "the page must not reach the network"
    assert "upright: flip False, rotation 0.0, shift 0.1" in page
    assert "shapes/3 (/m/shapes/3) (continue)" in page
    assert "truncated &lt;b&gt;" in page  # names and reasons are escaped
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["augment"] == "upright" and saved["test"]["labels"] == LABELS

    png = tmp_path / "index.png"
    pixels = render(index, png)
    # Rendered: text and figures make the page far from blank all the way down to the last figure.
    assert pixels.shape == (3000, 1280) and pixels.std() > 20
    assert (pixels[2000:] < 200).mean() > 0.01, "the lower figures did not render"
    print(f"rendered {index} to {png}")


class _Built(Exception):
    """Stops a run once its model is built: the test only needs the starting weights."""


def _tiny(tmp_path: Path, data: Path, **extra) -> TrainConfig:
    return tiny_train_config(data, tmp_path / "models", **extra)


def _published_variables(version: str) -> dict[str, np.ndarray]:
    import tensorflow as tf
    from fovea.trainer.parent import saved_variables

    return {v.name: v.numpy() for v in saved_variables(tf.saved_model.load(version))}


@pytest.mark.slow
def test_tensorboard_logs_and_retraining_from_a_published_version(tmp_path: Path) -> None:
    import tensorflow as tf
    from fovea.trainer.train import run

    data = tmp_path / "data"
    generate(data, classes=2, per_class=8, size=32, seed=0)
    parent = run(_tiny(tmp_path, data, tensorboard=str(tmp_path / "tb")), log=lambda msg: None)
    tags = set()
    for events in (tmp_path / "tb" / "m").rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            tags.update(value.tag for value in event.summary.value)
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate", "training images"} <= tags, tags
    assert any(tag.startswith("augmented (photo)") for tag in tags), tags

    parent_vars = _published_variables(parent.version_path)
    started: dict[str, dict[str, np.ndarray]] = {}

    def snapshot(event: str, model, base) -> None:
        if event == "built":
            started[model.name + str(len(started))] = {v.name: v.numpy() for v in model.variables}

    # Same classes: the whole model starts from the parent and trains on (here, the same) data.
    child = run(_tiny(tmp_path, data, weights=parent.version_path), log=lambda msg: None, on_event=snapshot)
    (first,) = started.values()
    assert first.keys() == parent_vars.keys()
    for name, value in parent_vars.items():
        np.testing.assert_array_equal(first[name], value, err_msg=name)
    meta = json.loads((Path(child.version_path) / "assets.extra" / "fovea.json").read_text())
    assert child.version_path.endswith("/m/2") and meta["parent"].startswith("m/1 (")
    assert child.metrics.parent_mode == "continue"
    assert f"{meta['parent']} (continue)" in Path(child.report_index).read_text()

    # Other classes: the parent's base, a new head.
    other = tmp_path / "other"
    generate(other, classes=3, per_class=6, size=32, seed=1)
    started.clear()

    def stop(event: str, model, base) -> None:
        snapshot(event, model, base)
        raise _Built

    with pytest.raises(_Built):
        run(
            _tiny(tmp_path, other, name="m3", weights=parent.version_path),
            log=lambda msg: None,
            on_event=stop,
        )
    (second,) = started.values()
    for name, value in parent_vars.items():
        if name.startswith("probabilities/"):
            assert second[name].shape[-1] == 3 and value.shape[-1] == 2
        else:
            np.testing.assert_array_equal(second[name], value, err_msg=name)


def test_chance_level_is_told_apart_by_a_binomial_margin() -> None:
    from fovea.trainer import chance

    # The run: 3 classes, 90 images from scratch, 9 test images, accuracy 0.333.
    told = chance.warnings(
        accuracy=0.333, classes=3, test_images=9, train_images={"a": 24, "b": 24, "c": 24}, weights="none"
    )
    assert "near chance" in told[0] and "0.648" in told[0], told  # 1/3 + 2 sqrt(2/9 / 9)
    assert (
        "--weights imagenet" in told[1] and "--weights PATH.h5" in told[1] and "24 training images" in told[1]
    )
    assert "9 test images are few" in told[2]
    # Well above the margin, or 0.5 on 300 test images (the margin is then 0.388): nothing to say.
    assert (
        chance.warnings(accuracy=0.9, classes=3, test_images=9, train_images={"a": 1}, weights="none") == []
    )
    assert (
        chance.warnings(accuracy=0.5, classes=3, test_images=300, train_images={"a": 1}, weights="imagenet")
        == []
    )
    pretrained = chance.warnings(
        accuracy=0.36, classes=3, test_images=300, train_images={"a": 5}, weights="imagenet"
    )
    assert len(pretrained) == 2 and "--weights" not in " ".join(pretrained), pretrained
    assert "Check that each folder holds the class it is named for" in pretrained[1]


def test_report_names_what_was_trained_and_warns_near_chance(tmp_path: Path) -> None:
    truth = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    metrics = _metrics(
        truth, np.zeros_like(truth), backbone="vgg16", input_size=32, weights="random (--weights none: trained from scratch)",
        warnings=["test accuracy 0.333 is near chance: <guessing>"], train_seconds=161.2,
    )  # fmt: skip
    index = report.write_report(tmp_path, metrics=metrics, labels=LABELS)
    page = index.read_text()
    assert "<th>model</th><td>vgg16, input 32x32 px</td>" in page
    assert "<th>base weights</th><td>random (--weights none: trained from scratch)</td>" in page
    assert (
        "<div class='warning'><h2>Warning</h2><p>test accuracy 0.333 is near chance: &lt;guessing&gt;" in page
    )
    assert "161 s on 1 replica(s)" in page
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["warnings"] == metrics.warnings and saved["train_seconds"] == 161.2
    assert "total_seconds" not in saved
