"""A small reader of the Prometheus text format, enough to summarise fovea's own /metrics.

The demo runs with the thin client's dependencies only, so it does not use prometheus-client's parser.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            continue
        name, _, labels, value = match.groups()
        samples.append(Sample(name, dict(_LABEL.findall(labels or "")), float(value)))
    return samples


def scrape(url: str, timeout: float = 5.0) -> list[Sample]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read().decode("utf-8"))


def total(samples: Iterable[Sample], name: str, **labels: str) -> float:
    return sum(
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def buckets(samples: Iterable[Sample], histogram: str, **labels: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of a histogram, summed over other labels, ascending."""
    sums: dict[float, float] = {}
    for s in samples:
        if s.name == f"{histogram}_bucket" and all(s.labels.get(k) == v for k, v in labels.items()):
            bound = float(s.labels["le"])
            sums[bound] = sums.get(bound, 0.0) + s.value
    return sorted(sums.items())


def per_bucket(cumulative: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Turn cumulative buckets into (upper bound, count in this bucket), dropping empty ones."""
    out, prev = [], 0.0
    for bound, count in cumulative:
        if count - prev > 0:
            out.append((bound, count - prev))
        prev = count
    return out
