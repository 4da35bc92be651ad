"""How unlike the training data an image is, measured on a class the head never saw.

What can be served. The energy score (Liu et al., "Energy-based Out-of-distribution Detection", 2020)
is E(x) = -T * logsumexp(f(x) / T) over the logits f. The exported model returns calibrated
probabilities p = softmax(f / T), and log p = f / T - logsumexp(f / T): the log-probabilities are the
logits up to a constant per row, and that constant is exactly what energy measures, because
logsumexp(log p) = 0 for every image. Energy computed from served probabilities is therefore 0 for
every input: no signal at all. From the probabilities only functions of the normalised vector are
left: the maximum softmax probability (MSP, Hendrycks & Gimpel, 2017), which ranks images exactly
as the maximum log-probability does (the "max-logit" of log p). Serving energy would need the
export to return the head's pre-softmax logits as a second output.

So the trainer measures both, on the audit's frozen-backbone features (cheap: a numpy head per
class, milliseconds): for each class c, a softmax head is trained on the training images of the
other classes; the threshold is the score that 95% of the other classes' validation images stay
under; the left-out class's validation and test images are the out-of-distribution set and the
other classes' test images the in-distribution one. Detection rate = the share of left-out images
over the threshold (the true-positive rate at 95% in-distribution acceptance); AUROC is threshold-free.

What it does not measure: the backbone's features of a fine-tuned model were shaped by all classes'
training images, the left-out one's included, so the figures are optimistic for a fine-tuned model;
and an unseen class of demo textures is not every kind of unlike image a caller may send.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ACCEPT = 0.95  # share of in-distribution validation images under the threshold
# Clearly useful: it ranks an unseen class above known ones 4 times in 5, and flags at least half of it
# while wrongly flagging 5% of known images. Below either, a caller's "unlike the training data" flag
# would mostly be noise.
USEFUL_AUROC = 0.8
USEFUL_DETECTION = 0.5


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """-T * logsumexp(logits / T) per row: higher is less like the training data."""
    z = np.asarray(logits, np.float64) / temperature
    top = z.max(axis=1)
    return -temperature * (top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def msp_score(logits: np.ndarray) -> np.ndarray:
    """1 - the maximum softmax probability: the same ordering the served probabilities allow."""
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return 1.0 - (e / e.sum(axis=1, keepdims=True)).max(axis=1)


def auroc(outliers: np.ndarray, inliers: np.ndarray) -> float:
    """P(an outlier's score > an inlier's), ties counted half (the Mann-Whitney statistic)."""
    outliers, inliers = np.asarray(outliers, np.float64), np.asarray(inliers, np.float64)
    if not len(outliers) or not len(inliers):
        return float("nan")
    greater = (outliers[:, None] > inliers[None, :]).mean()
    ties = (outliers[:, None] == inliers[None, :]).mean()
    return float(greater + 0.5 * ties)


def _scores(kind: str, logits: np.ndarray) -> np.ndarray:
    return energy(logits) if kind == "energy" else msp_score(logits)


def measure(x: np.ndarray, targets: np.ndarray, splits: Any, labels: Any, l2: float) -> dict[str, Any] | None:
    """Leave-one-class-out detection on features `x` (already reduced, as the audit's heads use them).

    None with fewer than 3 classes (leaving one out leaves a single class: nothing to classify) or a
    class without training, validation or test images.
    """
    from fovea.trainer.audit import fit_softmax

    classes = len(labels)
    splits = np.asarray(splits)
    if classes < 3:
        return None
    per_class = []
    for c in range(classes):
        known = targets != c
        train, val, test = (known & (splits == s) for s in ("train", "val", "test"))
        unseen = ~known & (splits != "train")
        if not (train.any() and val.any() and test.any() and unseen.any()):
            return None
        remap = np.cumsum(np.arange(classes) != c) - 1  # the other classes numbered 0..classes-2
        w_mean, w_std, w, b = fit_softmax(
            x[train], remap[targets[train]], classes - 1, l2=l2, standardise=False
        )

        def logits(mask: np.ndarray, w_mean=w_mean, w_std=w_std, w=w, b=b) -> np.ndarray:
            return ((x[mask] - w_mean) / w_std) @ w + b

        row: dict[str, Any] = {
            "left_out": labels[c],
            "unseen_images": int(unseen.sum()),
            "known_test": int(test.sum()),
        }
        for kind in ("energy", "msp"):
            s_val, s_test, s_out = (_scores(kind, logits(m)) for m in (val, test, unseen))
            threshold = float(np.quantile(s_val, ACCEPT))
            row[kind] = {
                "detection": float((s_out > threshold).mean()),
                "known_flagged": float((s_test > threshold).mean()),
                "auroc": auroc(s_out, s_test),
            }
        per_class.append(row)
    out: dict[str, Any] = {"accept": ACCEPT, "per_class": per_class}
    for kind in ("energy", "msp"):
        out[kind] = {
            k: float(np.mean([r[kind][k] for r in per_class]))
            for k in ("detection", "known_flagged", "auroc")
        }
    best = out["energy"]
    out["useful"] = bool(best["auroc"] >= USEFUL_AUROC and best["detection"] >= USEFUL_DETECTION)
    return out


def sentence(result: dict[str, Any] | None) -> str:
    """The report's and the log's verdict, with the figures."""
    if result is None:
        return "not measured: it needs at least 3 classes, each with training, validation and test images"
    e, m = result["energy"], result["msp"]
    figures = (
        f"leaving each class out in turn, the energy score flags {e['detection']:.0%} of the unseen class's "
        f"images (AUROC {e['auroc']:.3f}) at the threshold 95% of known validation images stay under "
        f"({e['known_flagged']:.0%} of known test images flagged); the top served probability flags "
        f"{m['detection']:.0%} (AUROC {m['auroc']:.3f})"
    )
    if result["useful"]:
        return figures + "."
    return (
        figures + f". Too weak to help (useful would be AUROC at least {USEFUL_AUROC} and detection at least "
        f"{USEFUL_DETECTION:.0%}): the server does not return an out-of-distribution score."
    )
