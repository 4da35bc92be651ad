"""Perceptual hashes for near-duplicate images: a difference hash (dHash) in numpy on PIL thumbnails.

dHash compares each pixel of a small grayscale thumbnail with its right neighbour, so it survives
re-encoding, resizing and small brightness changes, and costs one decode per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HASH_SIZE = 16  # 16 x 16 = 256 bits: 8 x 8 collides on plain textures with similar layouts
# At most this many differing bits (of 256) make two images near-duplicates: re-encoding and
# resizing flip a handful; two different photos of one scene differ in far more.
NEAR_BITS = 12


def dhash(path: str, size: int = HASH_SIZE) -> np.ndarray:
    """The image's difference hash as a bool array of size*size bits."""
    from PIL import Image

    with Image.open(path) as im:
        gray = np.asarray(im.convert("L").resize((size + 1, size), Image.BILINEAR), np.float32)
    return (gray[:, 1:] > gray[:, :-1]).reshape(-1)


def hashes(paths: Sequence[str]) -> np.ndarray:
    """[N, bits] bool; an unreadable image gets an all-False row that matches nothing (see pairs)."""
    rows = []
    for p in paths:
        try:
            rows.append(dhash(p))
        except (OSError, ValueError):
            rows.append(np.zeros(HASH_SIZE * HASH_SIZE, bool))
    return np.stack(rows) if rows else np.zeros((0, HASH_SIZE * HASH_SIZE), bool)


def near_pairs(bits: np.ndarray, max_distance: int = NEAR_BITS) -> list[tuple[int, int, int]]:
    """Every (i, j, Hamming distance) with i < j and distance <= max_distance.

    All pairs by matrix products in blocks: 20,000 images are 2e8 pairs, a few seconds in numpy.
    Flat hashes (a blank image: nearly every bit equal) are left out; they match each other trivially.
    """
    n = len(bits)
    if n < 2:
        return []
    x = bits.astype(np.float32)
    ones = x.sum(axis=1)
    informative = (ones >= 0.05 * x.shape[1]) & (ones <= 0.95 * x.shape[1])
    out: list[tuple[int, int, int]] = []
    block = 2048
    for start in range(0, n, block):
        a = x[start : start + block]
        # Hamming distance = |a| + |b| - 2 a.b
        dist = ones[start : start + block, None] + ones[None, :] - 2.0 * (a @ x.T)
        ii, jj = np.nonzero(dist <= max_distance + 0.5)
        for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
            gi = start + i
            if gi < j and informative[gi] and informative[j]:
                out.append((gi, j, round(float(dist[i, j]))))
    return out
