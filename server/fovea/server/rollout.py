"""Rollouts on the server: each model's last good rollout file, label resolution and traffic routing.

The manager hands every polled `rollout.json` to `Rollouts.update`; a file that fails validation keeps
the last good one (logged once per distinct error, counted in fovea_rollout_file_errors). The schema
is `fovea.contract.rollout`'s, shared with `fovea rollout`. No grpc, no TensorFlow.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable

from fovea.contract.rollout import ROUTE_KEY_HEADER, Rollout, RolloutError, parse
from fovea.server.batcher import LowPriorityDropped
from fovea.server.errors import clip

log = logging.getLogger(__name__)

__all__ = ["ROUTE_KEY_HEADER", "Rollouts", "bucket", "route_key"]


def bucket(key: str) -> float:
    """A routing key's fixed point in [0, 1): the same key always lands on the same share."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def route_key(metadata: Iterable[tuple[str, object]] | None) -> str:
    """The caller's `x-fovea-route-key` from gRPC metadata or HTTP headers ("" when absent)."""
    for key, value in metadata or ():
        if key.lower() == ROUTE_KEY_HEADER:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return ""


def pick(traffic: dict[str, float], point: float) -> str:
    """The label whose slice of the cumulative shares (labels in name order) holds `point` in [0, 1)."""
    total = sum(traffic.values())
    edge = 0.0
    chosen = ""
    for label in sorted(traffic):
        if traffic[label] <= 0:
            continue
        chosen = label
        edge += traffic[label] / total
        if point < edge:
            return label
    return chosen  # rounding at the top edge


class Rollouts:
    def __init__(self, errors_counter, rng: random.Random | None = None) -> None:
        self._files: dict[str, Rollout] = {}
        self._bad: dict[str, str] = {}  # model -> the error last logged for its file
        self._errors = errors_counter  # Counter with a `model` label
        self._rng = rng or random.Random()

    def get(self, name: str) -> Rollout | None:
        return self._files.get(name)

    def update(self, name: str, text: bytes | None) -> None:
        """Take a model's polled file (None: no file, so no rollout); a bad one keeps the last good."""
        if text is None:
            if self._files.pop(name, None) is not None:
                log.info("rollout file of %s removed; unlabelled requests go to the newest version", name)
            self._bad.pop(name, None)
            return
        try:
            new = parse(text)
        except RolloutError as exc:
            message = str(exc)
            self._errors.labels(name).inc()
            if self._bad.get(name) != message:
                self._bad[name] = message
                kept = "the last good one" if name in self._files else "no rollout"
                log.error(
                    "rollout file of %s is invalid, keeping %s: %s",
                    name,
                    kept,
                    clip(message, 300, quote=False),
                )
            return
        self._bad.pop(name, None)
        if self._files.get(name) != new:
            log.info("rollout of %s: %s", name, new.to_json())
        self._files[name] = new

    def forget(self, name: str) -> None:
        self._files.pop(name, None)
        self._bad.pop(name, None)

    def pinned(self, name: str) -> set[int]:
        r = self._files.get(name)
        return r.pinned_versions() if r else set()

    def route(self, name: str, key: str | None, loaded: set[int] | frozenset[int] = frozenset()) -> str:
        """The label an unlabelled request goes to ("" when the model has no traffic shares).

        `key` None: not a prediction (metadata); the label with the largest share answers.
        "" : a random draw by the shares. Otherwise the key's fixed bucket (sticky).
        Only labels whose version is in `loaded` share the traffic, so a version still loading after
        the file named it does not fail its share of the callers who named no version; when none is
        loaded, the largest share's label is returned (and refused by the caller's lookup).
        """
        r = self._files.get(name)
        if r is None or not r.traffic:
            return ""
        traffic = {k: v for k, v in r.traffic.items() if v > 0 and r.labels[k] in loaded}
        if key is None or not traffic:
            return max(sorted(traffic or r.traffic), key=lambda label: r.traffic[label])
        point = bucket(key) if key else self._rng.random()
        return pick(traffic, point)

    def sample_shadow(self, name: str) -> int:
        """The shadow version a live request should also run on now (0: none)."""
        r = self._files.get(name)
        if r is None or r.shadow is None:
            return 0
        return r.shadow.version if self._rng.random() < r.shadow.share else 0


async def run_shadow(
    metrics, manager, live, shadow_version: int, rows: list, live_probs, tasks: set | None = None
) -> None:
    """Compute `rows` on the shadow version after the live answer and record the agreement.

    Below live work in priority (the batcher's low-priority queue): dropped (and counted) when the
    shadow version has live work queued or decoding, at submission or until its batch starts, so a
    shadow never waits in front of a live caller; it takes no admission and no deadline.
    """
    import asyncio

    import numpy as np

    name, v = live.name, str(shadow_version)
    count = metrics.shadow_requests
    await asyncio.sleep(0)  # let the live answer go out first
    try:
        shadow = manager.lookup(name, shadow_version)
    except Exception:
        count.labels(name, v, "dropped_unloaded").inc()
        return
    if (shadow.metadata.input_height, shadow.metadata.input_width) != (
        live.metadata.input_height,
        live.metadata.input_width,
    ) or len(shadow.metadata.labels) != len(live.metadata.labels):
        count.labels(name, v, "dropped_input_size").inc()
        return
    if shadow.queue_depth > 0:
        count.labels(name, v, "dropped_busy").inc()
        return
    try:
        with shadow.leased():
            # It yields to the live version too: both share the device, so a shadow computing beside
            # live work slowed it (bench/shadow_overhead.py: live p99 x1.5-3.5 with a copy as shadow).
            probs = await shadow.infer(
                rows, None, low_priority=True, yield_to=None if shadow is live else live
            )
    except asyncio.CancelledError:
        raise
    except LowPriorityDropped:
        count.labels(name, v, "dropped_busy").inc()
        return
    except Exception as exc:
        count.labels(name, v, "failed").inc()
        log.debug("shadow run on %s version %s failed: %s", name, v, exc)
        return
    count.labels(name, v, "computed").inc()
    live_top = np.argmax(live_probs, axis=1)
    shadow_top = np.argmax(probs, axis=1)
    labels = live.metadata.labels
    metrics.shadow_images.labels(name, v).inc(len(rows))
    metrics.shadow_top1_equal.labels(name, v).inc(int(np.sum(live_top == shadow_top)))
    metrics.shadow_abs_diff.labels(name, v).inc(float(np.abs(live_probs - probs).mean(axis=1).sum()))
    for a, b in zip(live_top.tolist(), shadow_top.tolist(), strict=True):
        metrics.shadow_confusion.labels(name, v, labels[a], labels[b]).inc()
