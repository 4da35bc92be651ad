"""The audit and calibration in a real (tiny) training run: flipped labels and a planted train/test
duplicate in demo data, the report's sections, suspects.csv, fovea.json, and --exclude."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="training needs the trainer extra")

from _browser import render
from _models import tiny_train_config
from fovea.trainer.demo_data import generate

pytestmark = pytest.mark.slow

PER_CLASS = {"train": 50, "val": 12, "test": 12}


def _data(root: Path) -> tuple[Path, list[str], str]:
    """Pre-split demo data with 10% of the training labels flipped and one training image copied
    (resized, re-encoded) into test. Returns (data, flipped paths, the planted copy)."""
    from PIL import Image

    data = root / "data"
    for seed, (split, n) in enumerate(PER_CLASS.items()):
        generate(data / split, classes=4, per_class=n, size=64, seed=seed)
    labels = sorted(p.name for p in (data / "train").iterdir())
    files = sorted((data / "train").rglob("*.png"))
    rng = np.random.default_rng(1)
    flipped = []
    for i in rng.choice(len(files), size=len(files) // 10, replace=False):
        f = files[i]
        others = [label for label in labels if label != f.parent.name]
        target = data / "train" / others[rng.integers(len(others))] / f"flipped_{f.name}"
        f.rename(target)
        flipped.append(str(target))
    original = sorted((data / "train" / "dots").glob("dots_*.png"))[0]
    copy = data / "test" / "dots" / "planted_copy.jpg"
    with Image.open(original) as im:
        im.resize((60, 60)).save(copy, quality=92)
    return data, flipped, str(copy)


def _labels(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "train").iterdir())


def test_audit_finds_flips_and_leakage_and_the_report_shows_them(tmp_path):
    from fovea.trainer.train import run

    data, flipped, copy = _data(tmp_path)
    # Random VGG16 features at 64 px (phase 1 trains the head only): what the audit sees of a model
    # that has barely trained. Its stages' pooled features still tell the textures apart (0.72
    # out-of-sample accuracy measured), which is what finding the flips needs.
    cfg = tiny_train_config(
        data, tmp_path / "models", input_size=64, epochs=1, fine_tune_epochs=0, audit=True
    )
    result = run(cfg, log=print)
    version = Path(result.version_path)
    meta = json.loads((version / "assets.extra/fovea.json").read_text())
    cal = meta["calibration"]
    assert cal["calibrated"] and cal["temperature"] > 0 and cal["target_precision"] == 0.99
    assert cal["test_ece_after"] <= cal["test_ece_before"]
    print(
        "calibration", {k: cal[k] for k in ("temperature", "test_ece_before", "test_ece_after", "threshold")}
    )

    rows = list(csv.DictReader((version / "report/suspects.csv").open()))
    assert rows and set(rows[0]) == {"path", "split", "given_label", "predicted_label", "score", "reason"}
    leaks = [r for r in rows if r["reason"].startswith("leakage")]
    assert [r["path"] for r in leaks] == [copy]
    label_rows = [r["path"] for r in rows if r["reason"].startswith("label")]
    first = label_rows[: int(len(flipped) * 1.5)]
    found = len(set(first) & set(flipped))
    print(f"flipped {len(flipped)}: {found} among the first {len(first)} label suspects")
    assert found >= 0.7 * len(flipped)

    page = (version / "report/index.html").read_text()
    assert "Leakage: 1 test images" in page
    recorded = json.loads((version / "report/metrics.json").read_text())
    print("ood", {k: recorded["ood"][k] for k in ("energy", "msp", "useful")})
    print("augmentation check", recorded["augmentation_check"])
    assert [r["left_out"] for r in recorded["ood"]["per_class"]] == sorted(_labels(data))
    assert {r["label"] for r in recorded["augmentation_check"]} == set(_labels(data))
    assert "the server does not return" in page or recorded["ood"]["useful"]
    for section in (
        "Calibration",
        "Abstention",
        "Data quality",
        "Likely label errors",
        "Near-duplicates",
        "Out-of-distribution signal",
        "Augmentation check",
    ):
        assert f"<h2>{section}</h2>" in page or f"<h3>{section}</h3>" in page
    # The published model served: a fovea.v1 Predict of an ambiguous test image (the least sure one)
    # with min_score 0.999 abstains, the same image without it gets its label.
    from _serving import client, serving

    with serving(tmp_path / "models") as srv, client(srv.port) as c:
        tests = sorted(str(p) for p in (data / "test").rglob("*.png"))
        plain = c.predict(tests, model=cfg.name)
        least = int(np.argmin([p.top[0].score for p in plain]))
        sure = c.predict(tests[least], model=cfg.name, min_score=0.999)[0]
        print(
            f"fovea.v1: {tests[least]} top {plain[least].top[0]} without min_score; abstained={sure.abstained} with 0.999"
        )
        assert not plain[least].abstained and plain[least].top[0].score < 0.999
        # The same labels; the scores to float32 rounding (alone, not in a batch of 49).
        assert sure.abstained and [t.label for t in sure.top] == [t.label for t in plain[least].top]
        assert np.allclose([t.score for t in sure.top], [t.score for t in plain[least].top], atol=1e-5)

    # A person keeps the leakage row only: the retrain leaves that image out.
    trimmed = tmp_path / "trimmed.csv"
    with trimmed.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(leaks)
    again = run(
        tiny_train_config(
            data,
            tmp_path / "models",
            epochs=1,
            fine_tune_epochs=0,
            audit=False,
            exclude=str(trimmed),
            # Both runs are at chance, so the gate's per-class recall comparison is a coin toss (it
            # rejected this retrain once: rings 0.1667 -> 0): not what this test is about.
            gate=False,
        ),
        log=print,
    )
    assert copy not in again.dataset.files["test"]
    assert len(again.dataset.files["test"]) == len(result.dataset.files["test"]) - 1

    # The page renders: the suspects grid is an image, and chromium draws it.
    assert re.search(r"alt='Likely label errors' src='data:image/png;base64,", page)
    shot = render(version / "report/index.html", tmp_path / "report.png", height=9000)
    assert (shot < 128).mean() > 0.01  # text and figures, not a blank page
