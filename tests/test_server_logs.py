"""Structured logs: JSON lines carrying the request id of the RPC that logged them."""

from __future__ import annotations

import json
import logging

import pytest
from fovea.server import logs


@pytest.fixture(autouse=True)
def restore_logging():
    yield
    root = logging.getLogger("fovea")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.propagate = True
    root.setLevel(logging.NOTSET)


def test_json_lines_carry_the_request_id(capsys) -> None:
    logs.setup("json", "INFO")
    log = logging.getLogger("fovea.server.test")
    token = logs.request_id.set("req-42")
    try:
        log.info("hello %s", "world")
    finally:
        logs.request_id.reset(token)
    log.warning("outside")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["message"] == "hello world" and lines[0]["request_id"] == "req-42"
    assert lines[0]["level"] == "INFO" and lines[0]["logger"] == "fovea.server.test"
    assert lines[1]["request_id"] == "-"
    logs.setup("text", "INFO")
    log.info("plain")
    assert "[-] plain" in capsys.readouterr().err
    assert logs.new_request_id() != logs.new_request_id()
