"""Model weights keyed by layer path, in memory and in .npz files (resumable phases, the export clone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _walk_layers(model: Any, prefix: str = ""):
    """(path, layer) of every layer holding weights, nested models expanded; augmentation layers
    (whose only state is a random generator) left out."""
    for layer in model.layers:
        if getattr(layer, "layers", None):
            yield from _walk_layers(layer, f"{prefix}{layer.name}|")
        elif layer.weights and not layer.name.startswith("aug_"):
            yield prefix + layer.name, layer


def get_layer_weights(model: Any) -> dict[str, list[np.ndarray]]:
    """Weights keyed by layer path. Whole-model weight lists are ordered by trainability, which
    phase 2 changes, and .h5 loading trips over distributed variables; this does neither."""
    return {path: [np.asarray(w.numpy()) for w in layer.weights] for path, layer in _walk_layers(model)}


def set_layer_weights(model: Any, weights: dict[str, list[np.ndarray]]) -> None:
    for path, layer in _walk_layers(model):
        layer.set_weights(weights[path])


def save_weights(model: Any, path: Path) -> None:
    arrays = {
        f"{key}#{i}": value
        for key, values in get_layer_weights(model).items()
        for i, value in enumerate(values)
    }
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)  # a kill mid-write never leaves a half file under the real name


def load_weights(model: Any, path: Path) -> None:
    with np.load(path) as f:
        weights: dict[str, list[np.ndarray]] = {}
        for key in sorted(f.files, key=lambda k: (k.rsplit("#", 1)[0], int(k.rsplit("#", 1)[1]))):
            weights.setdefault(key.rsplit("#", 1)[0], []).append(f[key])
    set_layer_weights(model, weights)
