"""Scores that mean what they say: temperature scaling, calibration error, and the abstention threshold.

Pure numpy, so it is tested on synthetic logits in milliseconds. The model's head ends in a softmax,
so its log-probabilities are its logits up to a constant per row; dividing them by T and taking the
softmax again is exactly temperature scaling (Guo et al., 2017). The temperature is fitted on the
validation split by minimising the negative log-likelihood, and export.py folds it into both
signatures, so every protocol returns calibrated probabilities.

A temperature fitted to a small validation split can fit its noise: a 32 px vgg16 run at chance saw
test ECE rise from 0.0495 to 0.0694 after calibration. choose_temperature therefore keeps T = 1 unless
a temperature fitted on some folds of the validation split lowers the NLL of the folds it did not see
(cross-validation on val; the test split is never looked at).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

ECE_BINS = 15  # Guo et al.'s choice; fewer images per bin than ~10 make a bin's accuracy noise
_EPS = 1e-12
_LOG_T_RANGE = (-3.0, 4.0)  # T from 0.05 to 55: far beyond what a trained classifier needs


def logits_of(probabilities: np.ndarray) -> np.ndarray:
    """Log-probabilities: the logits up to a per-row constant, which the softmax ignores."""
    return np.log(np.clip(np.asarray(probabilities, np.float64), _EPS, 1.0))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """What the exported signatures compute: softmax(log(p) / T)."""
    if temperature == 1.0:
        return np.asarray(probabilities, np.float64)
    return softmax(logits_of(probabilities) / temperature)


def nll(logits: np.ndarray, truth: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(truth)), truth]))


def fit_temperature(probabilities: np.ndarray, truth: np.ndarray) -> float:
    """The T minimising the NLL of softmax(log(p) / T) on labelled images (1.0 when there are none).

    NLL is smooth and unimodal in log T for these problems: a coarse grid finds the basin, a golden
    section search refines it.
    """
    truth = np.asarray(truth, np.int64)
    if len(truth) == 0:
        return 1.0
    logits = logits_of(probabilities)
    grid = np.linspace(*_LOG_T_RANGE, 71)
    losses = [nll(logits, truth, float(np.exp(g))) for g in grid]
    i = int(np.argmin(losses))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(logits, truth, float(np.exp(a))) < nll(logits, truth, float(np.exp(b))):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


CV_FOLDS = 5


def cross_validated_nll(
    probabilities: np.ndarray, truth: np.ndarray, folds: int = CV_FOLDS, seed: int = 0
) -> tuple[float, float]:
    """(held-out NLL of the raw scores, held-out NLL with a temperature fitted on the other folds),
    both averaged over every validation image."""
    truth = np.asarray(truth, np.int64)
    logits = logits_of(probabilities)
    order = np.random.default_rng(seed).permutation(len(truth))
    fold_of = np.empty(len(truth), np.int64)
    fold_of[order] = np.arange(len(truth)) % folds
    raw = scaled = 0.0
    for f in range(folds):
        held = fold_of == f
        if not held.any() or held.all():
            continue
        t = fit_temperature(probabilities[~held], truth[~held])
        raw += nll(logits[held], truth[held], 1.0) * held.sum()
        scaled += nll(logits[held], truth[held], t) * held.sum()
    return raw / len(truth), scaled / len(truth)


def choose_temperature(
    probabilities: np.ndarray, truth: np.ndarray, seed: int = 0
) -> tuple[float, dict[str, Any]]:
    """The temperature to fold in, and why: the NLL-minimising T on all of val when a temperature
    fitted on 4/5 of val lowers the NLL of the other 1/5 (summed over the five folds), else 1.0.

    Fewer than 2 images per fold cannot tell fitting from noise: T = 1.
    """
    truth = np.asarray(truth, np.int64)
    if len(truth) < 2 * CV_FOLDS:
        return 1.0, {"cv_nll_raw": None, "cv_nll_scaled": None, "kept_raw": True}
    raw, scaled = cross_validated_nll(probabilities, truth, seed=seed)
    keep_raw = not scaled < raw
    t = 1.0 if keep_raw else fit_temperature(probabilities, truth)
    t, bounded = _no_surer_than_measured(probabilities, truth, t)
    return t, {
        "cv_nll_raw": float(raw),
        "cv_nll_scaled": float(scaled),
        "kept_raw": bool(keep_raw),
        "bounded_by_accuracy": bounded,
    }


def wilson_lower(correct: int, n: int, z: float = 1.96) -> float:
    """The lower end of the 95% Wilson interval of a proportion."""
    if n == 0:
        return 0.0
    p = correct / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float((centre - spread) / (1 + z * z / n))


def _no_surer_than_measured(probabilities: np.ndarray, truth: np.ndarray, t: float) -> tuple[float, bool]:
    """A sharpening T (below 1) is raised, at most to 1, until the mean top score on val is at most
    the lower 95% bound of val accuracy.

    When every val image is right (a small split, or an easy one), the NLL keeps falling as T goes to
    0: the fit then sharpens without limit (T = 0.05 gave the demo a 1.000 score on a wrong answer).
    The data only says the accuracy is at least its lower bound, so the scores claim no more than
    that on average. With many val images and some errors the bound sits at the accuracy and the NLL
    fit is left as it is.
    """
    logits = logits_of(probabilities)
    correct = int((probabilities.argmax(axis=1) == truth).sum())
    bound = wilson_lower(correct, len(truth))

    def mean_top(temperature: float) -> float:
        return float(softmax(logits / temperature).max(axis=1).mean())

    # Only sharpening is bounded: a temperature above 1 makes scores less sure, never more.
    if t >= 1.0 or mean_top(t) <= bound:
        return t, False
    lo, hi = np.log(t), 0.0
    if mean_top(1.0) > bound:
        return 1.0, True  # the raw scores already claim more: sharpen nothing
    for _ in range(50):  # bisection on log T: the mean top score falls as T grows
        mid = (lo + hi) / 2
        if mean_top(float(np.exp(mid))) > bound:
            lo = mid
        else:
            hi = mid
    return float(np.exp(hi)), True


@dataclasses.dataclass
class Reliability:
    """Per confidence bin: the mean confidence, the accuracy and the count (empty bins: count 0)."""

    edges: list[float]
    confidence: list[float]
    accuracy: list[float]
    count: list[int]
    ece: float


def reliability(probabilities: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Expected calibration error (the count-weighted gap between confidence and accuracy) and its bins."""
    p = np.asarray(probabilities, np.float64)
    truth = np.asarray(truth)
    edges = np.linspace(0.0, 1.0, bins + 1)
    conf_bins, acc_bins, counts = [], [], []
    if len(p) == 0:
        return Reliability(edges.tolist(), [0.0] * bins, [0.0] * bins, [0] * bins, 0.0)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == truth
    # Right-closed bins, the first one closed: a confidence of exactly 1.0 falls in the last bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        counts.append(n)
        conf_bins.append(float(confidence[mask].mean()) if n else 0.0)
        acc_bins.append(float(correct[mask].mean()) if n else 0.0)
        if n:
            ece += n / len(p) * abs(acc_bins[-1] - conf_bins[-1])
    return Reliability(edges.tolist(), conf_bins, acc_bins, counts, float(ece))


def precision_coverage(
    probabilities: np.ndarray, truth: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, precision, coverage): answering only images whose top score is at least
    thresholds[k] answers coverage[k] of them, precision[k] of those correctly."""
    p = np.asarray(probabilities, np.float64)
    if len(p) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(truth)).astype(np.float64)
    order = np.argsort(-confidence, kind="stable")
    conf, corr = confidence[order], correct[order]
    answered = np.arange(1, len(p) + 1)
    precision = np.cumsum(corr) / answered
    # Ties: a threshold answers every image at that score, so keep only the last index of each score.
    last = np.r_[conf[1:] != conf[:-1], True]
    return conf[last], precision[last], (answered / len(p))[last]


def threshold_for_precision(probabilities: np.ndarray, truth: np.ndarray, target: float) -> float | None:
    """The lowest top-score threshold whose answered images reach `target` precision (the widest
    coverage that does), or None when no threshold does (the model would abstain on everything).

    A precision of 0.99 cannot be seen on fewer than 100 answers: at least 1 / (1 - target) images
    (all of them, on a smaller split) must be answered. Without this rule a chance-level demo model
    got "precision 0.99" from the one validation image it answered.
    """
    thresholds, precision, coverage = precision_coverage(probabilities, truth)
    n = len(probabilities)
    needed = n if target >= 1 else min(n, int(np.ceil(1 / (1 - target) - 1e-9)))
    answered = np.rint(coverage * n)
    ok = np.flatnonzero((precision >= target) & (answered >= needed))
    return float(thresholds[ok[-1]]) if len(ok) else None


def coverage_at(probabilities: np.ndarray, truth: np.ndarray, threshold: float | None) -> dict[str, Any]:
    """Share answered at `threshold` and the precision of those answers (None when nothing is answered)."""
    p = np.asarray(probabilities, np.float64)
    if threshold is None or len(p) == 0:
        return {"coverage": 0.0, "precision": None, "images": len(p)}
    answered = p.max(axis=1) >= threshold
    n = int(answered.sum())
    correct = (p.argmax(axis=1) == np.asarray(truth))[answered]
    return {
        "coverage": n / len(p),
        "precision": float(correct.mean()) if n else None,
        "images": len(p),
    }


def summarise(
    *,
    temperature: float,
    target_precision: float,
    val: tuple[np.ndarray, np.ndarray],
    test_raw: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """What fovea.json records under "calibration": the temperature, test ECE before and after, and the
    abstention threshold with its coverage on val and test. Inputs are raw (uncalibrated) softmax."""
    val_cal = apply_temperature(val[0], temperature)
    test_cal = apply_temperature(test_raw[0], temperature)
    threshold = threshold_for_precision(val_cal, val[1], target_precision)
    return {
        "temperature": temperature,
        "test_ece_before": reliability(*test_raw).ece,
        "test_ece_after": reliability(test_cal, test_raw[1]).ece,
        "val_nll_before": nll(logits_of(val[0]), np.asarray(val[1], np.int64), 1.0) if len(val[1]) else None,
        "val_nll_after": nll(logits_of(val[0]), np.asarray(val[1], np.int64), temperature)
        if len(val[1])
        else None,
        "target_precision": target_precision,
        "threshold": threshold,
        "val": coverage_at(val_cal, val[1], threshold),
        "test": coverage_at(test_cal, test_raw[1], threshold),
    }


@dataclasses.dataclass
class Calibrated:
    """One run's calibration: what fovea.json records, and the scores as the exported model gives them."""

    summary: dict[str, Any]
    val_probabilities: np.ndarray  # calibrated (raw with --no-calibrate)
    val_truth: np.ndarray
    test_probabilities: np.ndarray


def calibrate_run(
    cfg: Any,
    val: tuple[np.ndarray, np.ndarray],
    test_raw: tuple[np.ndarray, np.ndarray],
    log: Any = print,
) -> Calibrated:
    """Fit (or, with --no-calibrate, skip) the temperature and record the abstention threshold.

    The inputs are the trained Keras model's raw softmax, never a parent's exported scores, so a
    retrain from a calibrated version fits its own temperature from scratch.
    """
    temperature, why = choose_temperature(*val, seed=cfg.seed) if cfg.calibrate else (1.0, {})
    summary = summarise(
        temperature=temperature, target_precision=cfg.target_precision, val=val, test_raw=test_raw
    )
    summary["calibrated"] = bool(cfg.calibrate)
    summary.update(why)
    if why.get("kept_raw"):
        log(
            "calibration: kept the raw softmax (T = 1): a temperature fitted on part of the validation split "
            "did not lower the NLL of the rest"
            + (
                f" ({why['cv_nll_scaled']:.4f} against {why['cv_nll_raw']:.4f})"
                if why["cv_nll_raw"] is not None
                else ""
            )
        )
    threshold = summary["threshold"]
    log(
        f"calibration: temperature {temperature:.3f}, test ECE {summary['test_ece_before']:.4f} -> "
        f"{summary['test_ece_after']:.4f}; "
        + (
            f"precision {cfg.target_precision:g} from score {threshold:.4f} (coverage val "
            f"{summary['val']['coverage']:.2f}, test {summary['test']['coverage']:.2f})"
            if threshold is not None
            else f"no score threshold reaches precision {cfg.target_precision:g} on val"
        )
    )
    return Calibrated(
        summary=summary,
        val_probabilities=apply_temperature(val[0], temperature).astype(np.float32),
        val_truth=np.asarray(val[1]),
        test_probabilities=apply_temperature(test_raw[0], temperature).astype(np.float32),
    )
