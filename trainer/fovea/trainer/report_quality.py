"""The report's calibration and data-quality sections: reliability diagrams, the precision-coverage
curve, the suspects grid and report/suspects.csv."""

from __future__ import annotations

import base64
import dataclasses
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fovea.trainer import audit as audit_mod
from fovea.trainer import calibration as cal
from fovea.trainer.report import _pyplot

GRID_SUSPECTS = 16


@dataclasses.dataclass
class Quality:
    calibrated: cal.Calibrated
    test_raw: tuple[np.ndarray, np.ndarray]  # the uncalibrated test softmax and truth
    audit: audit_mod.Findings | None = None


def plot_reliability(before: cal.Reliability, after: cal.Reliability, temperature: float, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
    for ax, r, title in (
        (axes[0], before, "raw softmax"),
        (axes[1], after, f"calibrated (T = {temperature:.2f})"),
    ):
        edges = np.asarray(r.edges)
        centres = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        filled = np.asarray(r.count) > 0
        ax.bar(centres[filled], np.asarray(r.accuracy)[filled], width=width * 0.9, color="tab:blue",
               alpha=0.8, label="accuracy")  # fmt: skip
        ax.plot(np.asarray(r.confidence)[filled], np.asarray(r.accuracy)[filled], "o", color="crimson",
                markersize=4, label="(mean confidence, accuracy)")  # fmt: skip
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("top score")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}: test ECE {r.ece:.4f}")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle("Reliability on the test split", fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_precision_coverage(quality: Quality, summary: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    c = quality.calibrated
    for name, probs, truth in (
        ("validation", c.val_probabilities, c.val_truth),
        ("test", c.test_probabilities, quality.test_raw[1]),
    ):
        _, precision, coverage = cal.precision_coverage(probs, truth)
        ax.plot(coverage, precision, "-", linewidth=1.6, label=name)
    ax.axhline(summary["target_precision"], color="grey", linestyle="--", linewidth=1,
               label=f"target precision {summary['target_precision']:g}")  # fmt: skip
    if summary.get("threshold") is not None:
        ax.plot(summary["val"]["coverage"], summary["target_precision"], "*", color="crimson", markersize=13,
                label=f"threshold {summary['threshold']:.3f}")  # fmt: skip
    ax.set_xlabel("coverage (share of images answered)")
    ax.set_ylabel("precision of the answers")
    ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Answering only above a score: precision against coverage")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_suspects(rows: Sequence[audit_mod.Suspect], path: Path) -> None:
    from PIL import Image

    plt = _pyplot()
    rows = list(rows)[:GRID_SUSPECTS]
    cols = min(4, max(1, len(rows)))
    nrows = max(1, -(-len(rows) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(2.7 * cols, 3.0 * nrows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows, strict=False):
        try:
            with Image.open(r.path) as im:
                ax.imshow(np.asarray(im.convert("RGB")))
        except OSError:
            pass
        ax.set_title(f"{Path(r.path).name} ({r.split})\ngiven {r.given}\nlikely {r.predicted} {r.score:.2f}",
                     fontsize=8, color="crimson")  # fmt: skip
    fig.suptitle("Likely label errors, most likely first (report/suspects.csv lists them all)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def write(out: Path, quality: Quality, test_per_class: dict[str, dict[str, float]]) -> tuple[str, str]:
    """Write the figures and suspects.csv; return (the sections' HTML, a warning for the test metrics)."""
    e = html.escape
    c = quality.calibrated
    s = c.summary
    parts = ["<h2>Calibration</h2>"]
    before = cal.reliability(*quality.test_raw)
    after = cal.reliability(c.test_probabilities, quality.test_raw[1])
    plot_reliability(before, after, s["temperature"], out / "reliability.png")
    state = (
        f"temperature {s['temperature']:.3f} fitted on the validation split (NLL {s['val_nll_before']:.4f} → "
        f"{s['val_nll_after']:.4f}) and folded into the exported signatures"
        if s.get("calibrated") and not s.get("kept_raw")
        else "kept the raw softmax (T = 1): a temperature fitted on 4/5 of the validation split did not lower "
        "the NLL of the other 1/5"
        + (
            f" (cross-validated NLL {s['cv_nll_scaled']:.4f} against {s['cv_nll_raw']:.4f} raw)"
            if s.get("cv_nll_raw") is not None
            else f" (fewer than {2 * cal.CV_FOLDS} validation images)"
        )
        if s.get("calibrated")
        else "--no-calibrate: the served scores are the raw softmax"
    )
    parts.append(
        f"<p>{e(state[0].upper() + state[1:])}. Test expected calibration error {s['test_ece_before']:.4f} before, "
        f"{s['test_ece_after']:.4f} after ({len(quality.test_raw[1])} images, {cal.ECE_BINS} bins).</p>"
    )
    parts.append(_img(out / "reliability.png", "Reliability diagram"))
    parts.append("<h2>Abstention</h2>")
    plot_precision_coverage(quality, s, out / "precision_coverage.png")
    if s.get("threshold") is not None:
        parts.append(
            f"<p>Answering only when the top score is at least <b>{s['threshold']:.4f}</b> reached precision "
            f"{s['val']['precision']:.4f} on validation (target {s['target_precision']:g}), answering "
            f"{s['val']['coverage']:.1%} of it; on test it answers {s['test']['coverage']:.1%} with precision "
            f"{'-' if s['test']['precision'] is None else format(s['test']['precision'], '.4f')}. A caller asks "
            "for it with <code>use_model_threshold</code>.</p>"
        )
    else:
        parts.append(
            f"<p>No score threshold reaches precision {s['target_precision']:g} on validation: a request with "
            "<code>use_model_threshold</code> is refused for this version.</p>"
        )
    parts.append(_img(out / "precision_coverage.png", "Precision against coverage"))
    parts.append("<h2>Data quality</h2>")
    warning = ""
    # The width at a recall of 0.5 (the widest) depends on the count alone: a class of 12 test images
    # is thin whether it scored 0 or 1 (at an observed 0 the interval looked narrow, 0.24).
    thin = [
        (label, int(v["support"]), audit_mod.wilson_width(0.5 * v["support"], int(v["support"])))
        for label, v in test_per_class.items()
    ]
    thin = [t for t in thin if t[2] > audit_mod.WIDE_INTERVAL]
    if thin:
        items = "".join(
            f"<li>{e(label)}: {n} test images, a 95% interval up to {width:.2f} wide</li>"
            for label, n, width in thin
        )
        parts.append(
            "<p>Classes with too few test images for their figures to mean much (the 95% Wilson interval of a "
            f"recall near 0.5 is wider than {audit_mod.WIDE_INTERVAL}):</p><ul>{items}</ul>"
        )
    findings = quality.audit
    if findings is None:
        parts.append(
            "<p>The audit did not run (<code>--no-audit</code>, or more images than --audit auto covers).</p>"
        )
        return "".join(parts), warning
    rows = findings.rows()
    audit_mod.write_csv(out / audit_mod.SUSPECTS_CSV, rows)
    parts.append(
        f"<p>{findings.folds}-fold cross-validation of a softmax head on the trained model's pooled features: "
        f"out-of-sample accuracy {findings.cv_accuracy:.4f} on {findings.images} images. "
        f"{len(findings.label_suspects)} likely label errors, {len(findings.duplicates)} near-duplicate pairs. "
        f"<code>report/{audit_mod.SUSPECTS_CSV}</code> lists them; delete the rows you disagree with and "
        f"retrain with <code>fovea train --exclude suspects.csv</code>.</p>"
    )
    if findings.label_suspects:
        plot_suspects(findings.label_suspects, out / "suspects.png")
        parts.append("<h3>Likely label errors</h3>" + _img(out / "suspects.png", "Likely label errors"))
    if findings.duplicates:
        items = "".join(
            f"<tr><td>{e(d['kind'])}</td><td><code>{e(d['a'])}</code> ({e(d['split_a'])}, {e(d['label_a'])})</td>"
            f"<td><code>{e(d['b'])}</code> ({e(d['split_b'])}, {e(d['label_b'])})</td><td>{d['distance']}</td></tr>"
            for d in findings.duplicates[:50]
        )
        parts.append(
            "<h3>Near-duplicates</h3><table><tr><th>kind</th><th>image</th><th>duplicate</th>"
            f"<th>bits apart</th></tr>{items}</table>"
        )
    parts.append(_ood_html(findings.ood))
    if findings.augmentation is not None:
        parts.append(_augmentation_html(findings.augmentation))
    if findings.leakage:
        warning = (
            f"Leakage: {len(findings.leakage)} test images are near-duplicates of training or validation "
            "images (see Data quality), so these test figures are optimistic."
        )
    return "".join(parts), warning


def _ood_html(result: dict[str, Any] | None) -> str:
    from fovea.trainer import ood

    e = html.escape
    text = ood.sentence(result)
    out = f"<h3>Out-of-distribution signal</h3><p>{e(text[0].upper() + text[1:])}</p>"
    if result is None:
        return out
    rows = "".join(
        f"<tr><td>{e(r['left_out'])}</td><td>{r['unseen_images']}</td><td>{r['energy']['detection']:.0%}</td>"
        f"<td>{r['energy']['auroc']:.3f}</td><td>{r['msp']['detection']:.0%}</td><td>{r['msp']['auroc']:.3f}</td>"
        f"<td>{r['energy']['known_flagged']:.0%}</td></tr>"
        for r in result["per_class"]
    )
    return out + (
        "<p>Measured on the audit's frozen-backbone features with a head trained without the left-out class; "
        "the backbone itself saw every class in training, so these figures are if anything optimistic. Energy "
        "needs the head's logits, which the served probabilities do not carry (see ood.py).</p>"
        "<table><tr><th>left out</th><th>unseen images</th><th>energy: detected</th><th>energy: AUROC</th>"
        "<th>top probability: detected</th><th>top probability: AUROC</th><th>known test flagged (energy)</th>"
        f"</tr>{rows}</table>"
    )


def _augmentation_html(rows: list[dict[str, Any]]) -> str:
    from fovea.trainer import augment_check

    e = html.escape
    items = "".join(
        f"<tr><td>{e(r['label'])}</td><td>{r['images']}</td><td>{r['original']:.2f}</td><td>{r['augmented']:.2f}</td>"
        f"<td>{e(r['became'] or '')}</td>"
        f"<td>{'<b>this augmentation may change what the image shows</b>' if r['flagged'] else ''}</td></tr>"
        for r in rows
    )
    return (
        f"<h3>Augmentation check</h3><p>The audit's head (trained on the training split's features) on up to "
        f"{augment_check.IMAGES} validation images per class and {augment_check.DRAWS} augmented copies of each: "
        f"a class whose accuracy drops by {augment_check.DROP} or more under the augmentation preset is flagged. "
        "The head never saw augmented images, so a drop says the augmented copies look, to these features, "
        "unlike their class: check the flagged classes' rows in augmentation.png before trusting the preset "
        "(--augment upright turns off flips and rotation).</p>"
        "<table><tr><th>class</th><th>images</th><th>accuracy on originals</th><th>on augmented copies</th>"
        f"<th>copies mostly taken for</th><th></th></tr>{items}</table>"
    )
