"""Echoed values are cut short, and rejected requests are logged at a bounded rate."""

from __future__ import annotations

import logging

import pytest
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


def test_an_unexpected_rest_failure_is_a_counted_500_with_the_request_id(tmp_path, caplog) -> None:
    pytest.importorskip("tensorflow", reason="the server tests need the server extra")
    import json
    import urllib.error
    import urllib.request

    from _serving import sample, start_server, stop_server

    srv = start_server(tmp_path)  # no model is needed: the failure is injected after parsing
    try:

        async def broken(request, deadline):
            raise RuntimeError("injected")

        srv.v2.infer = broken
        body = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1], "data": [0]}]})
        request = urllib.request.Request(
            f"http://127.0.0.1:{srv.http_port}/v2/models/x/infer",
            data=body.encode(),
            headers={"X-Request-Id": "req-500"},
        )
        with (
            caplog.at_level(logging.ERROR, logger="fovea.server.calls"),
            pytest.raises(urllib.error.HTTPError) as failure,
        ):
            urllib.request.urlopen(request, timeout=30)
        assert failure.value.code == 500
        assert "request id req-500" in json.loads(failure.value.read())["error"]
        assert "injected" not in failure.value.reason
        assert (
            sample(srv, "fovea_requests_total", protocol="v2-http", method="ModelInfer", code="INTERNAL") == 1
        )
        assert any(r.exc_info and "ModelInfer failed" in r.getMessage() for r in caplog.records)
    finally:
        stop_server(srv)
