"""Test-split evaluation: accuracy, per-class precision/recall/F1 and the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from fovea.trainer.results import Evaluation


def predict(model: Any, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, C], true label indices [N]) over a stream of (images, one-hot labels)."""
    import tensorflow as tf

    step = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    probs, truth = [], []
    for images, onehot in dataset:
        probs.append(np.asarray(step(images), dtype=np.float32))
        truth.append(np.argmax(onehot.numpy(), axis=1))
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(probs), np.concatenate(truth)


def scores(truth: np.ndarray, predicted: np.ndarray, labels: Sequence[str]) -> Evaluation:
    """Accuracy, per-class precision/recall/F1/support, macro F1, and the confusion matrix (rows: truth)."""
    k = len(labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    per_class = {}
    for i, label in enumerate(labels):
        tp = confusion[i, i]
        predicted_i, actual_i = confusion[:, i].sum(), confusion[i, :].sum()
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / actual_i if actual_i else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(actual_i),
        }
    total = int(confusion.sum())
    return Evaluation(
        accuracy=float(np.trace(confusion) / total) if total else 0.0,
        macro_f1=float(np.mean([c["f1"] for c in per_class.values()])) if per_class else 0.0,
        support=total,
        per_class=per_class,
        confusion_matrix=confusion.tolist(),
        labels=list(labels),
    )


def evaluate(model: Any, dataset: Any, labels: Sequence[str]) -> tuple[Evaluation, np.ndarray, np.ndarray]:
    """(scores, probabilities [N, C], true label indices [N]); the arrays feed the report's mistakes."""
    probs, truth = predict(model, dataset)
    predicted = probs.argmax(axis=1) if len(probs) else truth
    return scores(truth, predicted, labels), probs, truth
