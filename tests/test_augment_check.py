"""The per-class augmentation check (augment_check.py) on images whose class a flip changes: a class
told by which half is bright is flagged under flips, one told by the top half is not."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the augmentation layers need the trainer extra")

from fovea.trainer import audit, augment_check  # noqa: E402
from fovea.trainer.config import TrainConfig  # noqa: E402
from PIL import Image  # noqa: E402

SIZE = 32
LABELS = ["left", "right", "top"]


def _image(label: str, rng: np.random.Generator) -> np.ndarray:
    im = rng.integers(0, 40, (SIZE, SIZE, 3)).astype(np.uint8)
    half = {"left": (slice(None), slice(0, SIZE // 2)), "right": (slice(None), slice(SIZE // 2, None))}
    im[half.get(label, (slice(0, SIZE // 2), slice(None)))] += 200
    return im


def _halves(images):
    """Features: the brightness of the left, right, top and bottom halves."""
    x = tf.reduce_mean(tf.cast(images, tf.float32), axis=3)
    h = SIZE // 2
    return tf.stack(
        [tf.reduce_mean(x[:, :, :h], [1, 2]), tf.reduce_mean(x[:, :, h:], [1, 2]),
         tf.reduce_mean(x[:, :h, :], [1, 2]), tf.reduce_mean(x[:, h:, :], [1, 2])], axis=1
    )  # fmt: skip


def test_a_class_a_flip_turns_into_another_is_flagged(tmp_path):
    rng = np.random.default_rng(0)
    files, targets = [], []
    for c, label in enumerate(LABELS):
        for i in range(augment_check.IMAGES):
            path = tmp_path / f"{label}_{i}.png"
            Image.fromarray(_image(label, rng)).save(path)
            files.append(str(path))
            targets.append(c)
    targets = np.asarray(targets)
    originals = np.stack([np.asarray(Image.open(f)) for f in files])
    x = _halves(originals).numpy()
    head = audit.fit_softmax(x, targets, len(LABELS), l2=0.01)
    # Flips only: what the preset does to these images is mirror them.
    cfg = TrainConfig(data=str(tmp_path), models=str(tmp_path), input_size=SIZE, augment="none", flip=True)
    rows = augment_check.check(cfg, _halves, lambda f: f, head, files, targets, LABELS)
    by = {r["label"]: r for r in rows}
    assert [r["label"] for r in rows] == LABELS and all(r["original"] == 1.0 for r in rows)
    assert by["left"]["flagged"] and by["left"]["became"] == "right"
    assert by["right"]["flagged"] and by["right"]["became"] == "left"
    assert not by["top"]["flagged"] and by["top"]["augmented"] == 1.0
    assert all(r["copies"] == augment_check.IMAGES * augment_check.DRAWS for r in rows)
