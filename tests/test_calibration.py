"""Calibration, abstention thresholds and the data audit's numpy parts, on synthetic data; and the
temperature folded into an exported SavedModel's signatures."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
from fovea.trainer import audit, phash
from fovea.trainer import calibration as cal


def overconfident(n: int = 4000, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of logits drawn from a calibrated model, then multiplied by 4: far too sure."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), truth] += 1.5
    # Labels drawn from the calibrated probabilities make softmax(logits) calibrated by construction.
    calibrated = cal.softmax(logits)
    truth = np.array([rng.choice(classes, p=row) for row in calibrated])
    return cal.softmax(logits * 4.0), truth


def test_temperature_recovers_the_overconfidence_and_lowers_ece():
    probs, truth = overconfident()
    t = cal.fit_temperature(probs, truth)
    assert 3.5 < t < 4.5  # the factor the logits were sharpened by
    test_probs, test_truth = overconfident(seed=1)
    before = cal.reliability(test_probs, test_truth).ece
    after = cal.reliability(cal.apply_temperature(test_probs, t), test_truth).ece
    assert before > 0.1 and after < 0.03, (before, after)
    assert cal.nll(cal.logits_of(probs), truth, t) < cal.nll(cal.logits_of(probs), truth, 1.0)


def test_a_calibrated_model_keeps_temperature_near_one():
    probs, truth = overconfident()
    t = cal.fit_temperature(cal.apply_temperature(probs, 4.0), truth)
    assert 0.9 < t < 1.1


def test_threshold_reaches_the_target_precision_with_the_widest_coverage():
    # Scores 0.9..0.5; the two lowest are wrong: precision 1 down to 0.6, then 5/6 and 5/7.
    probs = np.array([[s, 1 - s] for s in (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)])
    truth = np.array([0, 0, 0, 0, 0, 1, 1])
    # 0.99 needs 100 answers (here: all 7), and all 7 reach only 5/7.
    assert cal.threshold_for_precision(probs, truth, 0.99) is None
    assert cal.threshold_for_precision(probs, truth, 0.8) == pytest.approx(0.7)
    # 0.6 needs 3 answers: the widest coverage reaching it is all of them (5/7 >= 0.6).
    assert cal.threshold_for_precision(probs, truth, 0.6) == pytest.approx(0.6)
    assert cal.threshold_for_precision(probs[:3], truth[:3], 0.99) == pytest.approx(0.85)
    assert cal.coverage_at(probs, truth, 0.75) == {"coverage": 5 / 7, "precision": 1.0, "images": 7}
    # Every answer wrong: no threshold reaches it, the model would abstain on everything.
    assert cal.threshold_for_precision(probs, 1 - truth[:1].repeat(7), 0.99) is None


def test_summary_records_threshold_and_coverage():
    val, test = overconfident(seed=2), overconfident(seed=3)
    s = cal.summarise(temperature=4.0, target_precision=0.9, val=val, test_raw=test)
    assert s["test_ece_after"] < s["test_ece_before"]
    assert s["val"]["precision"] >= 0.9 and 0 < s["val"]["coverage"] < 1
    assert abs(s["test"]["precision"] - 0.9) < 0.05


def test_exported_signatures_return_calibrated_probabilities(tmp_path):
    pytest.importorskip("tensorflow", reason="the export needs the trainer extra")
    import tensorflow as tf
    from _models import export_tiny
    from fovea.trainer.export import read_metadata

    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    raw_dir = export_tiny(tmp_path, "raw")
    hot_dir = export_tiny(tmp_path, "hot", calibration={"temperature": 0.25, "threshold": 0.6})
    raw = (
        tf.saved_model.load(str(raw_dir))
        .signatures["serving_default"](images=images)["probabilities"]
        .numpy()
    )
    loaded = tf.saved_model.load(str(hot_dir))
    hot = loaded.signatures["serving_default"](images=images)["probabilities"].numpy()
    np.testing.assert_allclose(hot, cal.apply_temperature(raw, 0.25), atol=1e-5)
    assert not np.allclose(hot, raw, atol=1e-3)
    png = [tf.io.encode_png(i).numpy() for i in images]
    hot_bytes = loaded.signatures["serving_bytes"](image_bytes=tf.constant(png))["probabilities"].numpy()
    np.testing.assert_allclose(hot_bytes, hot, atol=1e-5)
    meta = read_metadata(str(hot_dir))
    assert meta.calibration["temperature"] == 0.25 and meta.score_threshold == 0.6
    # The weights kept for a retrain (parent.py) are the uncalibrated model's: the same as the raw
    # export's (in order: Keras numbered the second model's layers on), and no extra variable carries
    # the temperature.
    from fovea.trainer.parent import saved_variables

    kept = [v.numpy() for v in saved_variables(loaded)]
    plain = [v.numpy() for v in saved_variables(tf.saved_model.load(str(raw_dir)))]
    assert len(kept) == len(plain)
    for mine, theirs in zip(kept, plain, strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_confident_disagreement_finds_flipped_labels():
    rng = np.random.default_rng(0)
    classes, n = 4, 400
    truth = rng.integers(0, classes, n)
    x = rng.normal(0, 1, (n, 8))
    x[np.arange(n), truth] += 3.0
    given = truth.copy()
    flipped = rng.choice(n, 40, replace=False)
    given[flipped] = (truth[flipped] + rng.integers(1, classes, 40)) % classes
    probs = audit.cross_val_probabilities(x, given, classes, 5, 0)
    ranked = [i for i, _, _, _ in audit.confident_disagreement(probs, given)]
    assert len(set(ranked[:60]) & set(flipped.tolist())) >= 0.9 * 40


def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def test_a_planted_train_test_duplicate_is_leakage(tmp_path):
    from fovea.trainer.demo_data import draw

    rng = np.random.default_rng(0)
    files, splits, targets = [], [], []
    for i in range(30):
        path = tmp_path / f"img{i}.png"
        _png(path, draw(["checks", "dots", "rings"][i % 3], 48, rng))
        files.append(str(path))
        splits.append("train" if i < 20 else "test")
        targets.append(i % 3)
    # The test copy is resized and re-encoded as JPEG: a near-duplicate, not a byte-identical file.
    from PIL import Image

    with Image.open(files[4]) as im:
        im.resize((40, 40)).save(tmp_path / "copy.jpg", quality=90)
    files.append(str(tmp_path / "copy.jpg"))
    splits.append("test")
    targets.append(1)
    pairs = audit.duplicate_pairs(files, splits, np.array(targets), ["checks", "dots", "rings"])
    assert [(p["a"], p["b"], p["kind"]) for p in pairs] == [(files[4], files[-1], "leakage")]


def test_phash_ignores_flat_images():
    bits = np.zeros((3, 256), bool)
    assert phash.near_pairs(bits) == []


def test_wilson_width_shrinks_with_images():
    assert audit.wilson_width(4, 5) > 0.5 > audit.wilson_width(90, 100)


def test_exclude_listed_drops_the_rows_left_in_the_csv(tmp_path):
    from fovea.trainer.data import Dataset

    ds = Dataset(
        labels=["a", "b"],
        files={"train": ["/d/a/1.png", "/d/b/2.png"], "val": ["/d/a/3.png"], "test": ["/d/b/4.png"]},
        targets={"train": [0, 1], "val": [0], "test": [1]},
        skipped=[],
        layout="DATA/<label>/*",
    )
    rows = [audit.Suspect("/d/b/2.png", "train", "b", "a", 0.9, 0.5, "label")]
    audit.write_csv(tmp_path / "s.csv", rows)
    out, removed = audit.exclude_listed(ds, str(tmp_path / "s.csv"))
    assert removed == 1 and out.files["train"] == ["/d/a/1.png"] and out.targets["train"] == [0]
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        csv.writer(f).writerow(["file"])
    with pytest.raises(ValueError, match="no 'path' column"):
        audit.exclude_listed(ds, str(tmp_path / "bad.csv"))
    with pytest.raises(ValueError, match="leaves the val split empty"):
        audit.write_csv(tmp_path / "all.csv", [dataclasses.replace(rows[0], path="/d/a/3.png")])
        audit.exclude_listed(ds, str(tmp_path / "all.csv"))


def test_a_temperature_is_kept_only_when_it_lowers_held_out_val_nll():
    """A calibrated model with a small validation split (48 images, as the demo data's): the NLL-best
    temperature fits the split's noise and raises test ECE; the cross-validated rule keeps T = 1."""
    rose_fitted = rose_chosen = 0
    for seed in range(20):
        val, val_truth = overconfident(n=48, seed=seed)
        val = cal.apply_temperature(val, 4.0)  # undo the sharpening: calibrated by construction
        test, test_truth = overconfident(n=2000, seed=100 + seed)
        test = cal.apply_temperature(test, 4.0)
        before = cal.reliability(test, test_truth).ece
        fitted = cal.fit_temperature(val, val_truth)
        chosen, why = cal.choose_temperature(val, val_truth)
        assert (chosen == 1.0) == why["kept_raw"]
        rose_fitted += cal.reliability(cal.apply_temperature(test, fitted), test_truth).ece > before
        rose_chosen += cal.reliability(cal.apply_temperature(test, chosen), test_truth).ece > before
    # Measured: 14 of 20 without the rule, 2 with it.
    assert rose_fitted >= 12 and rose_chosen <= 5, (rose_fitted, rose_chosen)


def test_the_rule_still_calibrates_an_overconfident_model_on_a_small_split():
    val, val_truth = overconfident(n=48, seed=3)
    t, why = cal.choose_temperature(val, val_truth)
    assert not why["kept_raw"] and why["cv_nll_scaled"] < why["cv_nll_raw"] and 2 < t < 8
    test, test_truth = overconfident(n=2000, seed=4)
    assert (
        cal.reliability(cal.apply_temperature(test, t), test_truth).ece
        < cal.reliability(test, test_truth).ece
    )
    assert cal.choose_temperature(val[:9], val_truth[:9]) == (
        1.0,
        {"cv_nll_raw": None, "cv_nll_scaled": None, "kept_raw": True},
    )


def test_a_val_split_with_no_errors_does_not_sharpen_without_limit() -> None:
    # An under-confident model that gets all 60 val images right: the NLL keeps falling as T goes to
    # 0, so an unbounded fit claims certainty. The scores may claim no more, on average, than the
    # lower 95% bound of the measured accuracy (about 0.94 for 60 of 60).
    from fovea.trainer import calibration

    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, 60)
    logits = rng.normal(0, 0.3, (60, 3))
    logits[np.arange(60), truth] += 1.0  # always the top class, by a small margin
    probs = calibration.softmax(logits)
    t, why = calibration.choose_temperature(probs, truth)
    scaled = calibration.apply_temperature(probs, t)
    bound = calibration.wilson_lower(60, 60)
    assert why["bounded_by_accuracy"] is True
    assert scaled.max(axis=1).mean() <= bound + 1e-6
    assert scaled.max(axis=1).mean() > probs.max(axis=1).mean()  # still sharpened, within the bound
