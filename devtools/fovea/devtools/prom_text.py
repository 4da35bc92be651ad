"""Summaries of fovea's own /metrics for the demo and the benchmarks, parsed by prometheus-client."""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


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


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float:
    """Estimate a quantile from cumulative buckets, interpolating linearly as PromQL's histogram_quantile."""
    if not cumulative or cumulative[-1][1] == 0:
        return math.nan
    rank = q * cumulative[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def per_bucket(cumulative: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Turn cumulative buckets into (upper bound, count in this bucket), dropping empty ones."""
    out, prev = [], 0.0
    for bound, count in cumulative:
        if count - prev > 0:
            out.append((bound, count - prev))
        prev = count
    return out
