"""The publish gate: its rule on Evaluation objects, and one small end-to-end run of both outcomes."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("numpy")

from fovea.trainer.evaluate import scores
from fovea.trainer.gate import decide

LABELS = ["cat", "dog"]


def _eval(truth, predicted):
    import numpy as np

    return scores(np.array(truth), np.array(predicted), LABELS)


REFERENCE = _eval([0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 0])  # 7/8


def test_a_copy_of_the_reference_passes():
    decision = decide(REFERENCE, REFERENCE, 0.01, 0.05, version=3)
    assert decision.passed and decision.reason == ""
    assert decision.per_class["dog"] == {"candidate_recall": 0.75, "reference_recall": 0.75, "delta": 0.0}


def test_a_worse_candidate_is_rejected_naming_the_figure():
    worse = _eval([0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 0, 0])  # 5/8
    decision = decide(worse, REFERENCE, 0.01, 0.05, version=3)
    assert not decision.passed
    assert decision.reason.startswith("test accuracy 0.6250 is 0.2500 below version 3's 0.8750")


def test_one_class_falling_is_rejected_even_when_accuracy_holds():
    # Same accuracy (7/8), but every mistake moved to "cat": cat recall 1.0 -> 0.75.
    shifted = _eval([0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1])
    decision = decide(shifted, REFERENCE, 0.01, 0.05, version=3)
    assert not decision.passed and "recall of class 'cat' fell from 1.0000" in decision.reason
    assert decide(shifted, REFERENCE, 0.01, 0.3, version=3).passed


@pytest.mark.slow
def test_gate_publishes_or_rejects_end_to_end(tmp_path):
    pytest.importorskip("tensorflow", reason="the trainer tests need the trainer extra")
    from _models import tiny_train_config
    from fovea import contract
    from fovea.trainer import train
    from fovea.trainer.demo_data import generate
    from fovea.trainer.gate import GateRejected

    data, models = tmp_path / "data", tmp_path / "models"
    generate(data, classes=2, per_class=8, size=32, seed=0)
    # No reference yet: published, and fovea.json says why it was not gated.
    train.run(tiny_train_config(data, models))
    meta = json.loads((models / "m" / "1" / contract.METADATA_FILE).read_text())
    assert meta["metrics"]["gate"]["skipped"] and "no published version" in meta["metrics"]["gate"]["reason"]
    # A tolerance no model can meet (it must beat the reference by 1.0): the reference is evaluated
    # through its exported signature, the candidate rejected, nothing published. (Two runs only: the
    # accepting side of the rule is the unit tests above.)
    with pytest.raises(GateRejected, match=r"^not published: test accuracy .* below version 1's") as err:
        train.run(tiny_train_config(data, models, gate_tolerance=-1.0))
    assert contract.local_published_versions(models / "m") == [1]
    rejected = list((models / "m" / ".rejected").iterdir())
    assert len(rejected) == 1 and str(rejected[0]) in str(err.value)
    assert "Publish gate: against version 1" in (rejected[0] / "report" / "index.html").read_text()
    decision = json.loads((rejected[0] / "gate.json").read_text())
    assert not decision["passed"] and decision["reference_version"] == 1


def test_report_section_shows_both_sides():
    from fovea.trainer.gate import gate_html

    worse = _eval([0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 0, 0])
    decision = decide(worse, REFERENCE, 0.01, 0.05, version=3)
    page = gate_html(decision.to_dict(), worse.confusion_matrix, LABELS)
    assert "REJECTED: test accuracy 0.6250" in page and "Confusion, version 3" in page
    assert "<td>0.750</td><td>0.500</td><td>-0.250</td>" in page  # dog: reference, candidate, change
    assert "not gated: no published" in gate_html(
        {"skipped": True, "reason": "no published version"}, [], LABELS
    )
