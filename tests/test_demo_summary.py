"""The demo's latency line reports values that were measured, never quantiles interpolated in buckets."""

from __future__ import annotations

from fovea.devtools.demo_command import measured_summary


def test_every_reported_latency_is_a_measured_one():
    measured = [0.101, 0.095, 0.230, 0.099, 0.120, 0.097, 0.110, 0.105, 0.098, 0.500]
    summary = dict(measured_summary(measured))
    assert list(summary) == ["min", "p50", "p90", "max"]
    assert set(summary.values()) <= set(measured)
    assert summary["min"] == 0.095 and summary["max"] == 0.500
    assert summary["p50"] == 0.101  # nearest rank: the 5th of 10 sorted values
    assert summary["p90"] == 0.230  # the 9th


def test_a_single_request():
    assert measured_summary([0.1]) == [("min", 0.1), ("p50", 0.1), ("p90", 0.1), ("max", 0.1)]
