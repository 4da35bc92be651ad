"""The out-of-distribution measurement (ood.py) on synthetic features: a separable unseen class is
detected, structureless features are not, and energy from served probabilities carries nothing."""

from __future__ import annotations

import numpy as np
from fovea.trainer import calibration as cal
from fovea.trainer import ood


def _clusters(spread: float, seed: int = 0, classes: int = 4, per: int = 60) -> tuple:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, 16)) * spread
    targets = np.repeat(np.arange(classes), per)
    x = centres[targets] + rng.normal(0, 1, (len(targets), 16))
    splits = np.array((["train"] * 40 + ["val"] * 10 + ["test"] * 10) * classes)
    return x, targets, splits, [f"c{i}" for i in range(classes)]


def test_energy_from_probabilities_is_zero_so_it_needs_the_logits():
    logits = np.random.default_rng(0).normal(0, 3, (50, 5))
    served = cal.apply_temperature(cal.softmax(logits), 1.7)
    assert np.allclose(ood.energy(np.log(served)), 0.0, atol=1e-9)
    assert ood.energy(logits).std() > 0.1


def test_auroc_counts_ties_half():
    assert ood.auroc(np.array([2.0, 3.0]), np.array([1.0, 0.0])) == 1.0
    assert ood.auroc(np.array([1.0]), np.array([1.0])) == 0.5
    assert ood.auroc(np.array([0.0]), np.array([1.0, 2.0])) == 0.0


def test_a_separable_unseen_class_is_detected_and_called_useful():
    result = ood.measure(*_clusters(spread=4.0), l2=0.1)
    assert result is not None and result["useful"], result["energy"]
    assert result["energy"]["auroc"] > 0.9 and result["energy"]["detection"] > 0.5
    # The threshold keeps about 95% of known images: few known test images are flagged.
    assert result["energy"]["known_flagged"] < 0.2
    assert [r["left_out"] for r in result["per_class"]] == ["c0", "c1", "c2", "c3"]


def test_structureless_features_give_a_signal_reported_as_too_weak():
    result = ood.measure(*_clusters(spread=0.0), l2=0.1)
    assert result is not None and not result["useful"]
    assert abs(result["energy"]["auroc"] - 0.5) < 0.15
    assert "Too weak to help" in ood.sentence(result) and "does not return" in ood.sentence(result)


def test_two_classes_are_not_measured():
    x, targets, splits, labels = _clusters(spread=4.0, classes=2)
    assert ood.measure(x, targets, splits, labels, l2=0.1) is None
    assert ood.sentence(None).startswith("not measured")
