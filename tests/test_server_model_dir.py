"""A --model-dir that yields no model says why in the log once (not at every scan that finds nothing), and
--no-wait-for-model-dir turns it into an error at start; one that becomes unreadable, missing or empty
while a model serves retires nothing, under load."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("tensorflow", reason="the server tests need the server extra")

from _models import export_tiny
from _serving import sample, serving, start_server, stop_server, wait_until
from fovea.devtools.steady_load import SteadyLoad

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


# The defaults: only the storage fault could fail a request here (admission never refuses these two
# closed-loop callers: --max-queue-batches counts batches, and they make at most one).
STEADY: dict = {}


def _scans(server, reason: str) -> float:
    return sample(server, "fovea_model_dir_problems_total", reason=reason)


def _outage_under_load(server, start, end, reason: str, scans: int) -> dict:
    """Steady traffic while `start()` breaks storage for `scans` problem scans, then `end()` mends it."""
    with SteadyLoad(f"127.0.0.1:{server.port}", 16) as load:
        wait_until(lambda: load.counts.ok >= 5, what="traffic before the fault")
        before = _scans(server, reason)
        start()
        try:
            wait_until(
                lambda: _scans(server, reason) >= before + scans, timeout=60, what=f"{scans} {reason} scans"
            )
            assert sample(server, "fovea_model_dir_unreachable") == 1
            served = load.counts.ok
            wait_until(lambda: load.counts.ok >= served + 5, what="traffic during the fault")
        finally:
            end()
        wait_until(lambda: sample(server, "fovea_model_dir_unreachable") == 0, what="storage back")
        time.sleep(0.3)  # a few more scans: nothing is reloaded
    return load.counts.summary()


def test_a_model_folder_renamed_away_under_load_drops_nothing(tmp_path):
    models = tmp_path / "models"
    export_tiny(models, "tiny", 16)
    # 20 problem scans at 0.1 s: more than --retire-after-scans (5) and its grace (0.5 s), so a rule
    # that retired an absent model after the grace would show here.
    with serving(models, poll_interval=0.1, retire_after_scans=5, **STEADY) as srv:
        away = tmp_path / "away"
        counts = _outage_under_load(
            srv,
            lambda: (models / "tiny").rename(away),
            lambda: away.rename(models / "tiny"),
            "model_dir_empty",
            20,
        )
        # Before: UNAVAILABLE "no model is loaded yet" from the first scan without the folder, and
        # health NOT_SERVING until the reload after it came back.
        assert counts["requests_failed"] == 0, counts
        assert set(counts["health_answers"]) == {"SERVING"}, counts
        assert sample(srv, "fovea_model_loads_total", model="tiny") == 1  # never unloaded, never reloaded


def test_permission_errors_while_listing_drop_nothing(tmp_path):
    models = tmp_path / "models"
    export_tiny(models, "tiny", 16)
    with serving(models, poll_interval=0.1, retire_after_scans=5, **STEADY) as srv:
        # Tests run as root, which chmod 000 does not stop: the server's own storage raises instead,
        # as loader.GFileStorage does for a permission error.
        storage = srv.manager._source._storage

        class Denied:
            def __getattr__(self, name):
                def denied(*args):
                    raise PermissionError(13, "Permission denied", str(models))

                return denied

        def deny() -> None:
            srv.manager._source._storage = Denied()

        def allow() -> None:
            srv.manager._source._storage = storage

        counts = _outage_under_load(srv, deny, allow, "permission_denied", 20)
        assert counts["requests_failed"] == 0, counts
        assert set(counts["health_answers"]) == {"SERVING"}, counts
        assert sample(srv, "fovea_model_loads_total", model="tiny") == 1


def test_a_real_removal_still_retires_after_the_grace(tmp_path):
    models = tmp_path / "models"
    export_tiny(models, "tiny", 16)
    export_tiny(models, "other", 16)
    with serving(models, poll_interval=0.1, retire_after_scans=3) as srv:
        wait_until(lambda: srv.manager.loaded_versions("other") == [1], what="both models loaded")
        removed_at = time.monotonic()
        shutil.rmtree(models / "tiny")
        wait_until(lambda: not srv.manager.loaded_versions("tiny"), timeout=30, what="tiny retired")
        # Not at the first scan that misses it: three such scans are two poll intervals apart at least.
        assert time.monotonic() - removed_at >= 0.2
        assert srv.manager.loaded_versions("other") == [1] and srv.manager.ready
        assert _scans(srv, "model_dir_empty") == 0 and sample(srv, "fovea_model_dir_unreachable") == 0
