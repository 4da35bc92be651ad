"""The publish gate: a candidate is published only if it is not worse than a reference version.

The reference is the newest published version of the model with the same classes (or the one
--gate-against names). Both are evaluated on this run's test split: the candidate by the trainer,
the reference through its exported `serving_bytes` signature on the same files, so its figures are
what a server would answer. `decide` is the rule, pure and testable on Evaluation objects.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from fovea import contract
from fovea.trainer.results import Evaluation


class GateRejected(ValueError):
    """The candidate did worse than the reference; the message is the one line naming the figure."""


@dataclasses.dataclass
class GateDecision:
    """What the gate compared and decided; to_dict() goes into fovea.json and the report."""

    passed: bool
    reason: str  # one line: the failing figure, or why the gate did not run, or "" when it passed
    reference_version: int | None = None
    tolerance: float = 0.0
    class_tolerance: float = 0.0
    candidate_accuracy: float | None = None
    reference_accuracy: float | None = None
    per_class: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # label -> recalls
    reference_confusion_matrix: list[list[int]] = dataclasses.field(default_factory=list)
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def decide(
    candidate: Evaluation, reference: Evaluation, tolerance: float, class_tolerance: float, version: int
) -> GateDecision:
    """Pass iff accuracy drops by at most `tolerance` and no class's recall by more than `class_tolerance`."""
    per_class = {}
    failures: list[str] = []
    for label in candidate.labels:
        c = candidate.per_class[label]["recall"]
        r = reference.per_class.get(label, {}).get("recall", 0.0)
        per_class[label] = {"candidate_recall": c, "reference_recall": r, "delta": c - r}
        if r - c > class_tolerance + 1e-12:
            failures.append(
                f"recall of class {label!r} fell from {r:.4f} (version {version}) to {c:.4f}, more than "
                f"--gate-class-tolerance {class_tolerance:g}"
            )
    drop = reference.accuracy - candidate.accuracy
    if drop > tolerance + 1e-12:
        failures.insert(
            0,
            f"test accuracy {candidate.accuracy:.4f} is {drop:.4f} below version {version}'s "
            f"{reference.accuracy:.4f} on this run's test split (--gate-tolerance {tolerance:g})",
        )
    return GateDecision(
        passed=not failures,
        reason=failures[0] if failures else "",
        reference_version=version,
        tolerance=tolerance,
        class_tolerance=class_tolerance,
        candidate_accuracy=candidate.accuracy,
        reference_accuracy=reference.accuracy,
        per_class=per_class,
        reference_confusion_matrix=reference.confusion_matrix,
    )


def find_reference(
    models: str, name: str, labels: Sequence[str], against: int | None
) -> tuple[int | None, str]:
    """(version, "") of the reference, or (None, why there is none)."""
    from fovea.trainer.export import read_metadata

    root = posixpath.join(models, name)
    published = contract.local_published_versions(root)
    if against is not None:
        if against not in published:
            raise ValueError(
                f"--gate-against {against}: no such published version of {name} "
                f"(published: {', '.join(map(str, published)) or 'none'})"
            )
        candidates = [against]
    else:
        candidates = sorted(published, reverse=True)
    if not candidates:
        return None, "no published version to compare with"
    for version in candidates:
        meta = read_metadata(contract.version_path(root, version))
        if list(meta.labels) == list(labels):
            return version, ""
        if against is not None:
            return None, (
                f"version {version} has other classes ({', '.join(meta.labels)}) than this run "
                f"({', '.join(labels)}); not gated"
            )
    return None, f"no published version has this run's classes ({', '.join(labels)}); not gated"


def evaluate_reference(
    version_dir: str, files: Sequence[str], truth: np.ndarray, labels: Sequence[str]
) -> Evaluation:
    """The reference's scores on the test files, through its serving_bytes signature (batches of 32)."""
    import tensorflow as tf
    from fovea.trainer.evaluate import scores

    loaded = tf.saved_model.load(version_dir)
    call = loaded.signatures[contract.SIGNATURE_BYTES]
    predicted = []
    for start in range(0, len(files), 32):
        batch = [tf.io.read_file(f) for f in files[start : start + 32]]
        out = call(**{contract.INPUT_BYTES: tf.stack(batch)})[contract.OUTPUT]
        predicted.append(np.argmax(out.numpy(), axis=1))
    guesses = np.concatenate(predicted) if predicted else np.zeros((0,), np.int64)
    return scores(np.asarray(truth), guesses, labels)


def run_gate(
    cfg: Any,
    labels: Sequence[str],
    candidate: Evaluation,
    test_files: Sequence[str],
    truth: np.ndarray,
    log: Callable[[str], None],
) -> GateDecision | None:
    """The gate's decision for this run, or None when it is off (--no-gate)."""
    if cfg.gate is False:
        return None
    version, why = find_reference(cfg.models, cfg.name, labels, cfg.gate_against)
    if version is None:
        log(f"gate: {why}; publishing without a comparison")
        return GateDecision(passed=True, reason=why, skipped=True)
    path = contract.version_path(posixpath.join(cfg.models, cfg.name), version)
    reference = evaluate_reference(path, test_files, truth, labels)
    decision = decide(candidate, reference, cfg.gate_tolerance, cfg.gate_class_tolerance, version)
    log(
        f"gate: candidate {candidate.accuracy:.4f} vs version {version} {reference.accuracy:.4f} on "
        f"{candidate.support} test images: {'passed' if decision.passed else 'REJECTED'}"
    )
    return decision


def keep_rejected(models: str, name: str, report_dir: str, decision: GateDecision) -> str:
    """Move the rejected candidate's report out of the served tree: MODELS/NAME/.rejected/<time>/."""
    import json

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = os.path.join(models, name, ".rejected", stamp)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copytree(report_dir, os.path.join(target, contract.REPORT_DIR))
    with open(os.path.join(target, "gate.json"), "w") as f:
        json.dump(decision.to_dict(), f, indent=2)
    return target


def gate_html(
    gate: dict[str, Any] | None, candidate_confusion: list[list[int]], labels: Sequence[str]
) -> str:
    """The report's publish-gate section: the decision, a per-class side-by-side, both confusion matrices."""
    import html

    e = html.escape
    if not gate:
        return "<h2>Publish gate</h2><p>off (--no-gate)</p>"
    if gate.get("skipped"):
        return f"<h2>Publish gate</h2><p>not gated: {e(gate['reason'])}</p>"
    verdict = "passed" if gate["passed"] else f"REJECTED: {gate['reason']}"
    rows = "".join(
        f"<tr><td>{e(label)}</td><td>{c['reference_recall']:.3f}</td><td>{c['candidate_recall']:.3f}</td>"
        f"<td>{c['delta']:+.3f}</td></tr>"
        for label, c in gate["per_class"].items()
    )

    def matrix(m: list[list[int]]) -> str:
        head = "".join(f"<th>{e(label)}</th>" for label in labels)
        body = "".join(
            f"<tr><th>{e(labels[i])}</th>{''.join(f'<td>{v}</td>' for v in row)}</tr>"
            for i, row in enumerate(m)
        )
        return f"<table><tr><th>truth \\ predicted</th>{head}</tr>{body}</table>"

    return (
        f"<h2>Publish gate: against version {gate['reference_version']}</h2>"
        f"<p>{e(verdict)}. Test accuracy {gate['candidate_accuracy']:.4f} (this run) vs "
        f"{gate['reference_accuracy']:.4f} (version {gate['reference_version']}); tolerance "
        f"{gate['tolerance']:g}, per-class recall tolerance {gate['class_tolerance']:g}.</p>"
        "<table><tr><th>class</th><th>reference recall</th><th>candidate recall</th><th>change</th></tr>"
        f"{rows}</table><h3>Confusion, this run</h3>{matrix(candidate_confusion)}"
        f"<h3>Confusion, version {gate['reference_version']}</h3>{matrix(gate['reference_confusion_matrix'])}"
    )
