"""Requests that arrive while a server drains are refused with UNAVAILABLE, never CANCELLED.

Before: the requests still queued when the grace period ended were cancelled (CANCELLED).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the server tests need the server extra")

from _serving import client, export_slow, sample, start_server, stop_server, wait_until
from fovea.client import FoveaError

DELAY = 0.3
SIZE = 16


def test_calls_during_the_drain_get_unavailable_and_the_log_stays_clean(tmp_path, caplog) -> None:
    export_slow(tmp_path, "slow", DELAY, SIZE)
    srv = start_server(tmp_path, max_batch_size=2, max_queue_wait_ms=0)
    wait_until(lambda: srv.manager.ready, what="the slow model to load")
    codes: Counter = Counter()
    stop = threading.Event()
    lock = threading.Lock()

    def traffic() -> None:
        with client(srv.port, max_images_per_request=8) as fovea:
            while not stop.is_set():
                try:
                    fovea.predict(np.zeros((SIZE, SIZE, 3), np.uint8), timeout=10)
                    code = "OK"
                except FoveaError as exc:
                    code = exc.code.name
                    if code == "UNAVAILABLE" and "connect" in exc.details.lower():
                        code = "UNAVAILABLE (not listening)"
                with lock:
                    codes[code] += 1

    threads = [threading.Thread(target=traffic) for _ in range(6)]
    with caplog.at_level(logging.INFO):
        for t in threads:
            t.start()
        wait_until(lambda: sum(codes.values()) >= 6, what="traffic")
        # A grace shorter than the queued work: the drain times out with requests still queued.
        stop_server(srv, grace=DELAY)
        wait_until(lambda: codes["UNAVAILABLE (not listening)"] >= 6, what="calls after the server stopped")
        stop.set()
        for t in threads:
            t.join(30)
    served = {
        c: sample(srv, "fovea_requests_total", protocol="fovea.v1", method="Predict", code=c)
        for c in ("OK", "UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED")
    }
    print("answers seen by the callers:", dict(codes), "counted by the server:", served)
    # Every call a handler saw, including those cut off by the end of the grace period, was
    # answered OK or UNAVAILABLE.
    assert served["CANCELLED"] == 0 and served["DEADLINE_EXCEEDED"] == 0, served
    assert served["UNAVAILABLE"] > 0, "no call arrived during the drain; the test proved nothing"
    assert set(codes) <= {"OK", "UNAVAILABLE", "UNAVAILABLE (not listening)", "CANCELLED"}, dict(codes)
    # gRPC itself cancels calls that reach the transport as it closes, before any handler: at most
    # the one call each caller has in flight at that instant.
    assert codes["CANCELLED"] <= len(threads), dict(codes)
    log = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "CancelledError" not in log and "Traceback" not in log, log[-3000:]
    assert sample(srv, "fovea_requests_total", protocol="fovea.v1", method="Predict", code="CANCELLED") == 0
