"""A slow real model behind a tiny queue: shedding, deadlines and the drain, against a real server."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the server tests need the server extra")

from _serving import client, export_slow, sample, start_server, stop_server, wait_until
from fovea.client import FoveaError

DELAY = 0.5  # seconds per model call
SIZE = 16
IMAGE = np.zeros((SIZE, SIZE, 3), np.uint8)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("models")
    export_slow(models, "slow", DELAY, SIZE)
    return models


def slow_server(models_dir: Path):
    srv = start_server(
        models_dir, max_batch_size=1, max_queue_size=1, max_in_flight_batches=1, batch_timeout_ms=0
    )
    wait_until(lambda: srv.manager.ready, what="the slow model to load")
    return srv


@pytest.fixture(scope="module")
def server(models_dir):
    srv = slow_server(models_dir)
    yield srv
    stop_server(srv)


def connected_client(port: int):
    # No retries (a shed request must surface), and no metadata round trip inside timed calls.
    c = client(port, max_images_per_request=8)
    c.list_models()
    return c


def timed_call(fovea, timeout: float = 30.0) -> tuple[str, float]:
    start = time.monotonic()
    try:
        fovea.predict(IMAGE, timeout=timeout)
        code = "OK"
    except FoveaError as exc:
        code = exc.code.name
    return code, time.monotonic() - start


def test_queue_of_one_sheds_excess_requests_quickly(server) -> None:
    shed_before = sample(server, "fovea_shed_requests_total", model="slow")
    with connected_client(server.port) as fovea:
        barrier = threading.Barrier(6)

        def call(_: int) -> tuple[str, float]:
            barrier.wait()
            return timed_call(fovea)

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(call, range(6)))
    codes = [c for c, _ in results]
    # One computes, one waits in the queue, the rest are shed.
    assert codes.count("OK") >= 2, results
    shed = [t for c, t in results if c in ("RESOURCE_EXHAUSTED", "UNAVAILABLE")]
    assert len(shed) >= 2 and len(shed) + codes.count("OK") == 6, results
    # "Quickly": a shed request returns before even one model call could have finished.
    assert max(shed) < DELAY, results
    assert sample(server, "fovea_shed_requests_total", model="slow") - shed_before == len(shed)


def test_request_whose_deadline_passes_in_the_queue_is_never_computed(server) -> None:
    expired_before = sample(server, "fovea_expired_requests_total", model="slow")
    inferred_before = sample(server, "fovea_images_inferred_total", model="slow")
    batches_before = sample(server, "fovea_batches_total", model="slow")
    with connected_client(server.port) as fovea, ThreadPoolExecutor(1) as pool:
        first = pool.submit(timed_call, fovea)
        time.sleep(0.2)  # the first request is computing now (0.5 s); the next one must queue behind it
        code, _ = timed_call(fovea, timeout=0.15)
        assert code == "DEADLINE_EXCEEDED"
        assert first.result()[0] == "OK"
    wait_until(
        lambda: sample(server, "fovea_expired_requests_total", model="slow") - expired_before == 1,
        timeout=10,
        what="the expired counter",
    )
    time.sleep(DELAY)  # had it been computed, it would have finished by now
    assert sample(server, "fovea_images_inferred_total", model="slow") - inferred_before == 1
    assert sample(server, "fovea_batches_total", model="slow") - batches_before == 1
    assert (
        sample(
            server, "fovea_requests_total", protocol="fovea.v1", method="Predict", code="DEADLINE_EXCEEDED"
        )
        >= 1
    )


def test_stop_drains_in_flight_work_and_refuses_new(models_dir) -> None:
    srv = slow_server(models_dir)
    stopped = threading.Event()
    with connected_client(srv.port) as fovea:
        with ThreadPoolExecutor(2) as pool:
            in_flight = [pool.submit(timed_call, fovea) for _ in range(2)]  # one computing, one queued
            wait_until(
                lambda: sample(srv, "fovea_queue_depth_requests", model="slow", version="1") == 1,
                interval=0.01,
            )
            stopper = threading.Thread(target=lambda: (stop_server(srv, grace=10), stopped.set()))
            stopper.start()
            wait_until(lambda: fovea.health(timeout=5) == "NOT_SERVING", what="NOT_SERVING", interval=0.01)
            code, _ = timed_call(fovea, timeout=5)
            assert code == "UNAVAILABLE"
            assert [f.result()[0] for f in in_flight] == ["OK", "OK"]
        stopper.join(30)
    assert stopped.is_set()
