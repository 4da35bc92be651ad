"""Echoed values are cut short, and rejected requests are logged at a bounded rate."""

from __future__ import annotations

import logging

from fovea.server import logs
from fovea.server.errors import clip


def test_clip_cuts_long_values_and_says_how_long() -> None:
    assert clip("tiny") == "'tiny'"
    long = clip("n" * 20000)
    assert len(long) < 100 and "20000 characters" in long
    assert clip("a\x00b") == "'a\\x00b'"  # control characters are shown, not written raw
    assert clip("a, b", quote=False) == "a, b"


def test_rejections_are_throttled_and_summarised(caplog) -> None:
    now = [0.0]
    logger = logging.getLogger("fovea.test.throttle")
    throttle = logs.Throttle(logger, per_second=3, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="fovea.test.throttle"):
        for i in range(1000):
            throttle.log(logging.INFO, "rejected %d", i)
        now[0] = 1.5
        throttle.log(logging.INFO, "rejected %d", 1000)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "rejected 0",
        "rejected 1",
        "rejected 2",
        "997 more rejected requests were not logged",
        "rejected 1000",
    ]
