"""Answering only when sure: which threshold a request asks for, and whether a prediction abstains.

One rule for every protocol (the core calls it): a caller gives a minimum top score (0..1), or asks
for the one the trainer recorded for the version (fovea.json's calibration.threshold, the lowest top
score whose answers reached the target precision on validation). An abstention is an answer with a
flag, not an error: the labels and scores are still returned.
"""

from __future__ import annotations

import math

from fovea.contract import ModelMetadata
from fovea.server.errors import InvalidArgument


def threshold(min_score: float, use_model_threshold: bool, metadata: ModelMetadata) -> float | None:
    """The top score below which a prediction abstains, or None when the request asks for none."""
    if use_model_threshold:
        recorded = metadata.score_threshold
        if recorded is None:
            target = metadata.calibration.get("target_precision")
            why = (
                f"no score threshold reached precision {target:g} on its validation split"
                if isinstance(target, (int, float))
                else "it records no score threshold (trained before calibration, or with another tool)"
            )
            raise InvalidArgument(
                f"use_model_threshold: model {metadata.name!r} version {metadata.version}: {why}; send "
                "min_score instead, or retrain"
            )
        return recorded
    if not isinstance(min_score, (int, float)) or math.isnan(min_score) or not 0.0 <= min_score <= 1.0:
        raise InvalidArgument(f"min_score is {min_score!r}; it must be between 0 and 1 (0: no threshold)")
    return float(min_score) if min_score > 0 else None


def abstains(top_score: float, limit: float | None) -> bool:
    return limit is not None and top_score < limit
