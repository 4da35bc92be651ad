"""The data-quality audit: likely label errors, near-duplicates and leakage, and --exclude.

Out-of-sample probabilities for every labelled image come from k-fold cross-validation of a softmax
regression head (numpy) on the trained model's pooled features, computed once. Label errors follow
cleanlab's confident-learning idea, written here: each class's threshold is the mean probability the
model gives that class on the images labelled with it (its self-confidence); an image is suspect when
another class's probability reaches that class's threshold and beats the given label's, ranked by the
margin. Near-duplicates come from a perceptual hash (phash.py), inside a class, across classes, and
across splits, where a train/test pair is leakage.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

AUTO_LIMIT = 20_000  # images: --audit auto is on up to this (features + hashes cost ~one epoch)
FOLDS = 5
SUSPECTS_CSV = "suspects.csv"
CSV_FIELDS = ("path", "split", "given_label", "predicted_label", "score", "reason")
# A class whose test recall has a 95% Wilson interval wider than this tells too little to act on.
WIDE_INTERVAL = 0.3


@dataclasses.dataclass
class Suspect:
    path: str
    split: str
    given: str
    predicted: str
    score: float  # out-of-sample probability of `predicted` (label suspects) or 1 - distance/bits
    margin: float  # ranking key: p(predicted) - p(given) for label suspects
    reason: str


@dataclasses.dataclass
class Findings:
    """What the report's data-quality section shows."""

    images: int
    folds: int
    cv_accuracy: float
    label_suspects: list[Suspect]  # ranked, most likely first
    duplicates: list[dict[str, Any]]  # {a, b, split_a, split_b, label_a, label_b, distance, kind}
    seconds: float = 0.0
    ood: dict[str, Any] | None = None  # ood.measure's figures
    augmentation: list[dict[str, Any]] | None = None  # augment_check.check's rows (None: not run)
    # What the augmentation check reuses: the audit's feature projection and chosen L2 penalty.
    projection: Any = dataclasses.field(default=None, repr=False)
    l2: float = 0.1

    @property
    def leakage(self) -> list[dict[str, Any]]:
        return [d for d in self.duplicates if d["kind"] == "leakage"]

    def rows(self) -> list[Suspect]:
        """suspects.csv: label suspects first (ranked), then one row per duplicate pair's second image."""
        from fovea.trainer import phash

        out = list(self.label_suspects)
        for d in self.duplicates:
            out.append(
                Suspect(
                    d["b"],
                    d["split_b"],
                    d["label_b"],
                    d["label_a"],
                    1.0 - d["distance"] / phash.HASH_SIZE**2,
                    0.0,
                    f"{d['kind']}: near-duplicate of {d['a']} ({d['split_a']}, {d['label_a']}; "
                    f"{d['distance']} bits apart)",
                )
            )
        return out


def wanted(cfg: Any, dataset: Any) -> bool:
    if cfg.audit is not None:
        return bool(cfg.audit)
    return sum(len(f) for f in dataset.files.values()) <= AUTO_LIMIT


def _all_images(dataset: Any) -> tuple[list[str], list[str], np.ndarray]:
    files, splits, targets = [], [], []
    for split in ("train", "val", "test"):
        files += dataset.files[split]
        splits += [split] * len(dataset.files[split])
        targets += list(dataset.targets[split])
    return files, splits, np.asarray(targets, np.int64)


def extractor(model: Any, cfg: Any) -> Callable[[Any], Any]:
    """A function from float32 RGB 0..255 image batches to the pooled output of the base's last layer
    at each spatial resolution.

    The head's input alone (the last of them) is all a well-trained model needs; the earlier stages
    keep texture statistics that a weakly trained base (a few epochs from random weights) still
    separates well: on 32 px demo data the head's input alone gave 0.53 out-of-sample accuracy.
    """
    import tensorflow as tf
    import tf_keras as keras
    from fovea.trainer.backbones import preprocess_fn

    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    stages: dict[int, Any] = {}
    for layer in base.layers[1:]:
        shape = layer.output.shape
        if len(shape) == 4:
            stages[int(shape[1])] = layer.output  # the last layer at this resolution wins
    multi = keras.Model(base.inputs, list(stages.values()))
    preprocess = preprocess_fn(cfg.backbone)

    @tf.function(reduce_retracing=True)
    def extract(images: tf.Tensor) -> tf.Tensor:
        outs = multi(preprocess(images), training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return tf.concat([tf.reduce_mean(tf.cast(o, tf.float32), axis=[1, 2]) for o in outs], axis=1)

    return extract


def features(
    model: Any, files: Sequence[str], targets: np.ndarray, cfg: Any, num_classes: int, extract: Any = None
) -> np.ndarray:
    """Per file, in order: extractor(model, cfg)'s features."""
    from fovea.trainer import data as data_mod

    extract = extract or extractor(model, cfg)
    stream = data_mod.make_stream(
        list(files), list(targets), num_classes=num_classes, input_size=cfg.input_size,
        batch_size=cfg.batch_size or 32, training=False, seed=cfg.seed, cache=False,
    )  # fmt: skip
    out = [extract(images).numpy() for images, _ in stream]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def fit_softmax(
    x: np.ndarray, y: np.ndarray, classes: int, steps: int = 200, l2: float = 0.1, standardise: bool = True
) -> tuple:
    """Multinomial logistic regression by Adam on standardised features: (mean, std, W, b).

    The penalty is chosen per data set by cross_val_probabilities (see L2_CHOICES).
    """
    if standardise:
        mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    else:
        mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
    z = (x - mean) / std
    w = np.zeros((z.shape[1], classes))
    b = np.zeros(classes)
    onehot = np.eye(classes)[y]
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    lr, b1, b2 = 0.05, 0.9, 0.999
    for t in range(1, steps + 1):
        logits = z @ w + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / len(y)
        grads = [z.T @ g + l2 * w, g.sum(axis=0)]
        for k, (param, grad) in enumerate(zip((w, b), grads, strict=True)):
            m[k] = b1 * m[k] + (1 - b1) * grad
            v[k] = b2 * v[k] + (1 - b2) * grad**2
            param -= lr * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + 1e-8)
    return mean, std, w, b


def predict_softmax(params: tuple, x: np.ndarray) -> np.ndarray:
    mean, std, w, b = params
    logits = ((x - mean) / std) @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


# The L2 penalties (on the mean loss) tried; the one whose out-of-sample probabilities give the given
# labels the lowest NLL wins. No one value fits all: on 8-dim synthetic features 0.1 beat 1e-3 (0.94
# against 0.905 accuracy to the true labels), on 1984-dim features of 64 px demo images 0.01 beat 0.1
# (0.72 against 0.59).
L2_CHOICES = (0.01, 0.1, 1.0)


def cross_val_probabilities(x: np.ndarray, y: np.ndarray, classes: int, folds: int, seed: int) -> np.ndarray:
    """Each image's probabilities from a head that never saw it (stratified folds), at the L2 penalty
    that predicts the given labels best out of sample."""
    return cross_val_reduced(_reduce(x), y, classes, folds, seed)[0]


def cross_val_reduced(
    z: np.ndarray, y: np.ndarray, classes: int, folds: int, seed: int
) -> tuple[np.ndarray, float]:
    """cross_val_probabilities on features already reduced; also returns the L2 penalty it chose."""
    best, best_l2, best_nll = None, L2_CHOICES[0], np.inf
    for l2 in L2_CHOICES:
        probs = _cross_val(z, y, classes, folds, seed, l2)
        nll = -np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)))
        if nll < best_nll:
            best, best_l2, best_nll = probs, l2, nll
    return best, best_l2


PCA_DIMS = 256


def _reduce(x: np.ndarray) -> np.ndarray:
    """Standardised features rotated onto their top PCA_DIMS principal components (no labels used).

    Not whitened, and the heads do not standardise them again: a rotation leaves the L2 penalty and
    the geometry as they were, whereas whitening 256 components of 300 images amplified noise
    directions (8 of 20 flips found in the slow test against 18 without it).

    The stages' features are ~2,000 wide; fitted as they are, the 15 heads took 130 s for 300 images
    on a busy 2-core machine, mostly in thread-contended matrix products.
    """
    return project(x, projection(x))


def projection(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(mean, std, components or None): _reduce's transform, to apply to other images' features."""
    x = np.asarray(x, np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    if x.shape[1] <= PCA_DIMS:
        return mean, std, None
    _, _, vt = np.linalg.svd((x - mean) / std, full_matrices=False)
    return mean, std, vt[:PCA_DIMS].T


def project(x: np.ndarray, proj: tuple[np.ndarray, np.ndarray, np.ndarray | None]) -> np.ndarray:
    mean, std, components = proj
    z = (np.asarray(x, np.float64) - mean) / std
    return z if components is None else z @ components


def _cross_val(x: np.ndarray, y: np.ndarray, classes: int, folds: int, seed: int, l2: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fold_of = np.zeros(len(y), np.int64)
    for c in range(classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold_of[idx] = np.arange(len(idx)) % folds
    out = np.zeros((len(y), classes))
    for f in range(folds):
        held = fold_of == f
        if held.any() and (~held).any():
            out[held] = predict_softmax(
                fit_softmax(x[~held], y[~held], classes, l2=l2, standardise=False), x[held]
            )
    return out


def confident_disagreement(
    probabilities: np.ndarray, given: np.ndarray
) -> list[tuple[int, int, float, bool]]:
    """(image, suspected class, margin, confident), most likely first.

    First the confident disagreements: another class's probability reaches that class's
    self-confidence threshold and beats the given label's, largest margin first. Then the images whose
    most probable class is another one but below its threshold, by margin: with an over-confident head
    the thresholds are high and the first list alone missed a third of planted flips (synthetic test).
    """
    classes = probabilities.shape[1]
    thresholds = np.array(
        [probabilities[given == c, c].mean() if (given == c).any() else 1.0 for c in range(classes)]
    )
    p_given = probabilities[np.arange(len(given)), given]
    # Candidates: classes over their threshold and over the given label; of those, the most probable.
    over = (probabilities >= thresholds[None, :]) & (probabilities > p_given[:, None])
    over[np.arange(len(given)), given] = False
    masked = np.where(over, probabilities, -1.0)
    best = masked.argmax(axis=1)
    found = np.flatnonzero(masked.max(axis=1) >= 0)
    margins = probabilities[found, best[found]] - p_given[found]
    order = np.argsort(-margins, kind="stable")
    out = [(int(found[i]), int(best[found[i]]), float(margins[i]), True) for i in order]
    others = np.where(np.eye(classes, dtype=bool)[given], -1.0, probabilities)
    top = others.argmax(axis=1)
    rest = np.setdiff1d(np.flatnonzero(others.max(axis=1) > p_given), found)
    rest_margins = probabilities[rest, top[rest]] - p_given[rest]
    for i in np.argsort(-rest_margins, kind="stable"):
        out.append((int(rest[i]), int(top[rest[i]]), float(rest_margins[i]), False))
    return out


def duplicate_pairs(
    files: Sequence[str], splits: Sequence[str], targets: np.ndarray, labels: Sequence[str]
) -> list[dict[str, Any]]:
    """Near-duplicate pairs by perceptual hash; kind: leakage (test with train or val), across splits,
    across classes (the same image under two labels), or same class."""
    from fovea.trainer import phash

    pairs = phash.near_pairs(phash.hashes(files))
    out = []
    for i, j, distance in pairs:
        si, sj = splits[i], splits[j]
        # Keep the test image second: it is the one to drop (or move) to stop the leakage.
        if si == "test" and sj != "test":
            i, j, si, sj = j, i, sj, si
        if "test" in (si, sj) and si != sj:
            kind = "leakage"
        elif targets[i] != targets[j]:
            kind = "across classes"
        elif si != sj:
            kind = "across splits"
        else:
            kind = "same class"
        out.append(
            dict(a=files[i], b=files[j], split_a=si, split_b=sj, label_a=labels[targets[i]],
                 label_b=labels[targets[j]], distance=distance, kind=kind)
        )  # fmt: skip
    order = {"leakage": 0, "across classes": 1, "across splits": 2, "same class": 3}
    return sorted(out, key=lambda d: (order[d["kind"]], d["distance"]))


def audit_arrays(
    x: np.ndarray,
    files: Sequence[str],
    splits: Sequence[str],
    targets: np.ndarray,
    labels: Sequence[str],
    seed: int = 0,
) -> Findings:
    """The audit on precomputed features (tests call it with any features)."""
    started = time.monotonic()
    classes = len(labels)
    smallest = min(int((targets == c).sum()) for c in range(classes))
    folds = max(2, min(FOLDS, smallest))
    from fovea.trainer import ood

    proj = projection(x)
    z = project(x, proj)
    probs, l2 = cross_val_reduced(z, targets, classes, folds, seed)
    suspects = [
        Suspect(files[i], splits[i], labels[targets[i]], labels[c], float(probs[i, c]), margin,
                "label: confidently another class" if confident else "label: more likely another class")
        for i, c, margin, confident in confident_disagreement(probs, targets)
    ]  # fmt: skip
    return Findings(
        images=len(files),
        folds=folds,
        cv_accuracy=float((probs.argmax(axis=1) == targets).mean()) if len(targets) else 0.0,
        label_suspects=suspects,
        duplicates=duplicate_pairs(files, splits, targets, labels),
        seconds=round(time.monotonic() - started, 1),
        ood=ood.measure(z, targets, splits, labels, l2),
        projection=proj,
        l2=l2,
    )


def run_audit(cfg: Any, dataset: Any, model: Any, log: Callable[[str], None] = print) -> Findings | None:
    started = time.monotonic()
    files, splits, targets = _all_images(dataset)
    extract = extractor(model, cfg)
    x = features(model, files, targets, cfg, len(dataset.labels), extract)
    if len(x) != len(files):
        log(f"audit skipped: {len(files) - len(x)} images failed to decode while computing features")
        return None
    findings = audit_arrays(x, files, splits, targets, dataset.labels, cfg.seed)
    from fovea.trainer.model import augmentation_layers

    if augmentation_layers(cfg.augmentation(), cfg.seed):
        from fovea.trainer import augment_check

        train = np.asarray(splits) == "train"
        z = project(x, findings.projection)
        head = fit_softmax(z[train], targets[train], len(dataset.labels), l2=findings.l2, standardise=False)
        findings.augmentation = augment_check.check(
            cfg, extract, lambda f: project(f, findings.projection), head,
            dataset.files["val"], np.asarray(dataset.targets["val"]), dataset.labels,
        )  # fmt: skip
    findings.seconds = round(time.monotonic() - started, 1)
    from fovea.trainer import ood

    log(
        f"audit: {len(findings.label_suspects)} possible label errors, {len(findings.duplicates)} near-duplicate "
        f"pairs ({len(findings.leakage)} across train/val and test) in {findings.seconds:.0f} s"
    )
    log(f"out-of-distribution signal: {ood.sentence(findings.ood)}")
    flagged = [
        f"{r['label']} ({r['original']:.2f} -> {r['augmented']:.2f})"
        for r in findings.augmentation or []
        if r["flagged"]
    ]
    if flagged:
        log(f"augmentation check: accuracy drops sharply under augmentation for {', '.join(flagged)}")
    return findings


def write_csv(path: str | Path, rows: Sequence[Suspect]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for r in rows:
            writer.writerow([r.path, r.split, r.given, r.predicted, f"{r.score:.4f}", r.reason])


def wilson_width(successes: float, n: int, z: float = 1.96) -> float:
    """The width of the 95% Wilson score interval of a proportion (1.0 with no observations)."""
    if n <= 0:
        return 1.0
    p = successes / n
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 2 * spread / (1 + z * z / n)


def exclude_listed(dataset: Any, csv_path: str) -> tuple[Any, int]:
    """The dataset without the images a CSV's 'path' column lists (the split of the rest is unchanged).

    Raises ValueError for a missing file or one without a 'path' column.
    """
    try:
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or []):
                raise ValueError(f"--exclude {csv_path}: no 'path' column (see report/{SUSPECTS_CSV})")
            listed = {os.path.realpath(row["path"]) for row in reader if row.get("path")}
    except OSError as exc:
        raise ValueError(f"--exclude {csv_path}: {exc.strerror or exc}") from None
    removed = 0
    files, targets = {}, {}
    for split in dataset.files:
        keep = [i for i, p in enumerate(dataset.files[split]) if os.path.realpath(p) not in listed]
        removed += len(dataset.files[split]) - len(keep)
        files[split] = [dataset.files[split][i] for i in keep]
        targets[split] = [dataset.targets[split][i] for i in keep]
    for split, split_files in files.items():
        if not split_files:
            raise ValueError(f"--exclude {csv_path} leaves the {split} split empty")
    return dataclasses.replace(dataset, files=files, targets=targets), removed
