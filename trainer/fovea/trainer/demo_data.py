"""A small, learnable, labelled image set for demos and tests: procedurally drawn textures.

Each class is a texture family (checks, dots, grid, rings, stripes, zigzag) drawn with a random
foreground and background colour, scale within the class's band, position, any rotation, and pixel
noise. The cue of every class is its texture, which survives global pooling and the trainer's
augmentation (flips, rotations, zoom): no class is defined by an orientation, which a flip or a
rotation would change. numpy and PIL only, seeded, fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Pattern functions: (u, v, period) -> mask in 0..1, where (u, v) are rotated, centred pixel coordinates.
PatternFn = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def _stripes(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    return (np.sin(2 * math.pi * v / p) > 0).astype(np.float32)


def _grid(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    return ((np.abs((u / p) % 1.0 - 0.5) > 0.38) | (np.abs((v / p) % 1.0 - 0.5) > 0.38)).astype(np.float32)


def _checks(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    return ((np.sin(2 * math.pi * u / p) > 0) ^ (np.sin(2 * math.pi * v / p) > 0)).astype(np.float32)


def _dots(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    du = (u / p) - np.round(u / p)
    dv = (v / p) - np.round(v / p)
    return (du**2 + dv**2 < 0.09).astype(np.float32)


def _rings(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    return (np.sin(2 * math.pi * np.hypot(u, v) / p) > 0).astype(np.float32)


def _zigzag(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    tri = np.abs(((u / p) % 1.0) - 0.5) * p  # a triangle wave across u shifts the stripes down v
    return (np.sin(2 * math.pi * (v + tri) / (0.7 * p)) > 0).astype(np.float32)


CLASSES: dict[str, PatternFn] = {
    "checks": _checks,
    "dots": _dots,
    "grid": _grid,
    "rings": _rings,
    "stripes": _stripes,
    "zigzag": _zigzag,
}
# Each class's pattern period, as a fraction of the image size. The default four classes also differ in
# scale (bands about 1.6x apart, wider than the trainer's zoom of +-20%), which makes them distinct
# enough for a from-scratch (--weights none) ResNet50 to learn in minutes on a CPU.
PERIODS: dict[str, tuple[float, float]] = {
    "checks": (0.075, 0.09),
    "dots": (0.12, 0.145),
    "grid": (0.2, 0.24),
    "rings": (0.32, 0.4),
    "stripes": (0.15, 0.3),
    "zigzag": (0.15, 0.25),
}


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A foreground and background colour that differ clearly in brightness."""
    while True:
        fg, bg = rng.uniform(0, 255, size=(2, 3))
        if abs(fg.mean() - bg.mean()) > 60:
            return fg, bg


def draw(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 RGB image [size, size, 3] of a class, with random colour, scale, pose and noise."""
    pattern = CLASSES[label]
    period = rng.uniform(*PERIODS[label]) * size
    angle = math.radians(rng.uniform(0, 180))
    cy, cx = rng.uniform(0.3, 0.7, size=2) * size  # the pattern's centre (matters for rings)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    y, x = y - cy, x - cx
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    mask = pattern(u, v, period)[..., None]
    fg, bg = _colours(rng)
    image = mask * fg + (1 - mask) * bg
    image += rng.normal(0, rng.uniform(4, 20), size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def generate(
    out_dir: str | Path, classes: int = 4, per_class: int = 100, size: int = 64, seed: int = 0
) -> dict[str, int]:
    """Write `per_class` PNGs of each of the first `classes` texture classes to out_dir/<label>/.

    Returns {label: count}. Existing files with the same names are overwritten.
    """
    from PIL import Image

    if not 2 <= classes <= len(CLASSES):
        raise ValueError(f"classes must be between 2 and {len(CLASSES)}, got {classes}")
    if per_class < 1 or size < 8:
        raise ValueError("per_class must be >= 1 and size >= 8")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    counts = {}
    for label in list(CLASSES)[:classes]:
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(draw(label, size, rng)).save(folder / f"{label}_{i:04d}.png")
        counts[label] = per_class
    return counts
