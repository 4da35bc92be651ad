"""A --model-dir that yields no model says why in the log once (not at every scan that finds nothing), and
--no-wait-for-model-dir turns it into an error at start."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

pytest.importorskip("tensorflow", reason="the server tests need the server extra")

from _models import export_tiny
from _serving import sample, start_server, stop_server, wait_until

LOGGER = "fovea.server.manager"


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def _last_scan(srv) -> float:
    return sample(srv, "fovea_repository_last_scan_timestamp_seconds")


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("models")
    export_tiny(models, "tiny", 16)
    return models


@pytest.mark.parametrize("case", ["missing", "empty", "model folder", "version folder"])
def test_model_dir_that_serves_nothing_says_why(case, published, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    model_dir, expected = {
        "missing": (tmp_path / "nope", "does not exist"),
        "empty": (tmp_path, "is empty"),
        "model folder": (
            published / "tiny",
            f"is one model's folder (versions 1): use its parent, {published}",
        ),
        "version folder": (
            published / "tiny" / "1",
            f"is a version folder: use the folder above its model, {published}",
        ),
    }[case]
    srv = start_server(model_dir, poll_interval=0.1)
    try:
        # Scans 0.1 s apart: half a second of them after the first.
        wait_until(lambda: _last_scan(srv) > 0, timeout=30, what="a first scan")
        first = _last_scan(srv)
        wait_until(lambda: _last_scan(srv) > first + 0.5, timeout=30, what="more scans")
        assert not srv.manager.ready
    finally:
        stop_server(srv)
    # Said at the first scan, not again at the next ones while the reason stays the same.
    assert len(_warnings(caplog)) == 1, _warnings(caplog)
    message = _warnings(caplog)[0]
    assert message.startswith(f"--model-dir {model_dir} "), message
    assert expected in message, message
    assert "waiting for a model" in message and "--no-wait-for-model-dir" in message, message
    if case in ("missing", "empty"):
        assert "<model name>/<version>/saved_model.pb" in message, message


def test_a_served_model_dir_warns_nothing(published, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    srv = start_server(published, poll_interval=0.1)
    try:
        wait_until(lambda: srv.manager.ready, timeout=60, what="SERVING")
        assert _warnings(caplog) == []
    finally:
        stop_server(srv)


def test_no_wait_for_model_dir_fails_at_start_saying_why(tmp_path):
    from fovea.server.app import StartupError

    with pytest.raises(StartupError) as info:
        start_server(tmp_path / "nope", wait_for_model_dir=False)
    message = str(info.value)
    assert message.startswith(f"--model-dir {tmp_path / 'nope'} does not exist"), message
    assert "not waiting for one (--no-wait-for-model-dir)" in message, message
