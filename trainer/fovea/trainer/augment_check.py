"""Does the augmentation preset change what an image shows? Per class, the audit's head (trained on
the training split's features) on a few validation images against augmented copies of the same images.

A class whose accuracy drops sharply under augmentation is one where a flip, rotation or colour change
can turn it into another class (a "6" rotated is a "9"; "left arrow" flipped is "right arrow"): the
model is then trained on images labelled wrong. Cheap: IMAGES x (1 + DRAWS) images per class through the
feature extractor once, and one numpy head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

IMAGES = 8  # validation images per class
DRAWS = 4  # augmented copies of each
# Flagged when the augmented accuracy is this much below the originals' (absolute): with 8 images and 32
# copies a drop of 0.25 is two originals' worth, beyond what a preset that keeps the class should cost.
DROP = 0.25


def check(
    cfg: Any,
    extract: Callable[[Any], Any],
    project: Callable[[np.ndarray], np.ndarray],
    head: tuple,
    files: Sequence[str],
    targets: np.ndarray,
    labels: Sequence[str],
) -> list[dict[str, Any]]:
    """One row per class: {label, images, original, augmented, drop, flagged}. `files`/`targets` are the
    validation split; `head` predicts from projected features (audit.fit_softmax's parameters)."""
    import tensorflow as tf
    from fovea.trainer.audit import predict_softmax
    from fovea.trainer.report import augmented_draws

    rows = []
    targets = np.asarray(targets)
    for c, label in enumerate(labels):
        picked = [files[i] for i in np.flatnonzero(targets == c)[:IMAGES]]
        if not picked:
            continue
        originals, draws = augmented_draws(cfg, picked, draws=DRAWS)
        flat = draws.reshape((-1, *draws.shape[2:]))

        def predicted(images: np.ndarray) -> np.ndarray:
            x = extract(tf.constant(images, tf.float32)).numpy()
            return predict_softmax(head, project(x)).argmax(axis=1)

        original = float((predicted(originals) == c).mean())
        on_copies = predicted(flat)
        augmented = float((on_copies == c).mean())
        wrong = on_copies[on_copies != c]
        # Where the copies go: the class the augmentation makes them look like.
        became = labels[int(np.bincount(wrong, minlength=len(labels)).argmax())] if len(wrong) else None
        rows.append(
            dict(label=label, images=len(picked), copies=len(flat), original=original, augmented=augmented,
                 drop=original - augmented, flagged=original - augmented >= DROP, became=became)
        )  # fmt: skip
    return rows
