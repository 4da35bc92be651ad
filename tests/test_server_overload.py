"""A slow real model behind a tiny queue: shedding, deadlines and the drain, against a real server."""

from __future__ import annotations

import itertools
import threading
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


def slow_server(models_dir: Path, **overrides):
    # max_queue_wait_ms 0: the count bound alone (the time bound has its own test below). Batches of
    # up to 2: one queued image is not a full batch, so it waits in the queue (a full batch would
    # be formed ahead of the running one, out of the queue).
    settings = {"max_batch_size": 2, "max_queue_size": 1, "max_in_flight_batches": 1, "batch_timeout_ms": 0}
    srv = start_server(models_dir, **{**settings, "max_queue_wait_ms": 0, **overrides})
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


_order = itertools.count()


def timed_call(fovea, timeout: float = 30.0) -> tuple[str, int]:
    """The answer's code and its place in the order answers arrived (not a duration)."""
    try:
        fovea.predict(IMAGE, timeout=timeout)
        code = "OK"
    except FoveaError as exc:
        code = exc.code.name
    return code, next(_order)


def computing(srv) -> bool:
    """One request is inside the model: admitted, and nothing left waiting in the queue."""
    return sample(srv, "fovea_inflight_images") == 1 and (
        sample(srv, "fovea_queue_depth_requests", model="slow", version="1") == 0
    )


def test_queue_of_one_sheds_excess_requests_quickly(server) -> None:
    shed_before = sample(server, "fovea_shed_requests_total", model="slow")
    with connected_client(server.port) as fovea, ThreadPoolExecutor(6) as pool:
        # One computes, one waits in the queue (each placed by waiting on the server's state) ...
        running = pool.submit(timed_call, fovea)
        wait_until(lambda: computing(server), interval=0.005, what="the first request computing")
        queued = pool.submit(timed_call, fovea)
        wait_until(
            lambda: sample(server, "fovea_queue_depth_requests", model="slow", version="1") == 1,
            interval=0.005,
            what="the second request queued",
        )
        # ... and the rest, sent together, are shed.
        barrier = threading.Barrier(4)

        def call(_: int) -> tuple[str, int]:
            barrier.wait()
            return timed_call(fovea)

        shed = list(pool.map(call, range(4)))
        results = [running.result(), queued.result()]
    assert [c for c, _ in shed] == ["RESOURCE_EXHAUSTED"] * 4, shed
    assert [c for c, _ in results] == ["OK", "OK"], results
    # "Quickly": every shed request was answered before the first model call finished.
    assert max(t for _, t in shed) < min(t for _, t in results), (shed, results)
    assert sample(server, "fovea_shed_requests_total", model="slow") - shed_before == 4


@pytest.fixture
def unlearned_server(models_dir):
    """A server that has not timed its model yet (no warm-up, nothing computed): admission cannot
    foresee that a request will outlive its deadline, so the queue's own deadline check must act."""
    srv = slow_server(models_dir, warmup=False)
    yield srv
    stop_server(srv)


def test_request_whose_deadline_passes_in_the_queue_is_never_computed(unlearned_server) -> None:
    server = unlearned_server
    expired_before = sample(server, "fovea_expired_requests_total", model="slow")
    inferred_before = sample(server, "fovea_images_inferred_total", model="slow")
    batches_before = sample(server, "fovea_batches_total", model="slow")
    with connected_client(server.port) as fovea, ThreadPoolExecutor(1) as pool:
        first = pool.submit(timed_call, fovea)
        wait_until(lambda: computing(server), interval=0.005, what="the first request computing")
        code, _ = timed_call(fovea, timeout=0.15)  # queued behind a 0.5 s model call
        assert code == "DEADLINE_EXCEEDED"
        assert first.result()[0] == "OK"
    wait_until(
        lambda: sample(server, "fovea_expired_requests_total", model="slow") - expired_before == 1,
        timeout=10,
        what="the expired counter",
    )
    # Nothing is in flight any more: had the late request been computed, it would be counted below.
    wait_until(lambda: sample(server, "fovea_inflight_images") == 0, what="nothing in flight")
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


def test_queue_is_bounded_in_time_and_sheds_before_decoding(models_dir) -> None:
    # A queue of 10 but a 0.3 s cap on the expected wait ahead: with 0.5 s per call learned, a
    # request behind one that just started computing would wait about 0.5 s before its own call,
    # so it is shed on arrival, never computed.
    srv = slow_server(models_dir, max_queue_size=10, max_queue_wait_ms=300)
    try:
        with connected_client(srv.port) as fovea, ThreadPoolExecutor(1) as pool:
            assert timed_call(fovea)[0] == "OK"  # one call teaches the batcher its compute time
            shed_before = sample(srv, "fovea_shed_requests_total", model="slow")
            inferred_before = sample(srv, "fovea_images_inferred_total", model="slow")
            first = pool.submit(timed_call, fovea)
            wait_until(lambda: computing(srv), interval=0.005, what="the first request computing")
            code, order = timed_call(fovea)
            assert code == "RESOURCE_EXHAUSTED"
            # A deadline shorter than the expected wait is refused on arrival too, with a long bound.
            assert first.result()[0] == "OK" and first.result()[1] > order
            wait_until(lambda: sample(srv, "fovea_inflight_images") == 0, what="nothing in flight")
            assert sample(srv, "fovea_images_inferred_total", model="slow") - inferred_before == 1
            assert sample(srv, "fovea_shed_requests_total", model="slow") - shed_before == 1
    finally:
        stop_server(srv)


def test_images_in_flight_are_bounded_before_anything_is_decoded(models_dir) -> None:
    import io

    from PIL import Image

    srv = slow_server(models_dir, max_batch_size=2, max_queue_size=10, max_inflight_images=2)
    try:
        png = io.BytesIO()
        Image.fromarray(IMAGE).save(png, format="PNG")
        decoded_before = sample(srv, "fovea_preprocess_duration_seconds_count", model="slow")
        with connected_client(srv.port) as fovea, ThreadPoolExecutor(1) as pool:
            two = pool.submit(lambda: fovea.predict([IMAGE, IMAGE], timeout=30))  # raw: no decoding
            wait_until(lambda: sample(srv, "fovea_inflight_images") == 2, interval=0.005, what="2 in flight")
            with pytest.raises(FoveaError) as info:
                fovea.predict(png.getvalue(), timeout=30)
            assert info.value.code.name == "RESOURCE_EXHAUSTED" and "in flight" in info.value.details
            assert len(two.result()) == 2
        # The refused PNG was never decoded (before: decoded first, then refused by the queue bound).
        assert sample(srv, "fovea_preprocess_duration_seconds_count", model="slow") == decoded_before
        assert sample(srv, "fovea_shed_inflight_requests_total") == 1
    finally:
        stop_server(srv)


def _post_json(port: int, path: str, body: dict) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_rest_requests_in_flight_are_bounded_before_their_body_is_read(models_dir) -> None:
    # The REST port's bodies count against --max-concurrent-rpcs, as gRPC's calls do (docs/memory.md).
    srv = slow_server(models_dir, max_concurrent_rpcs=1)
    try:
        body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, SIZE, SIZE, 3],
                            "data": IMAGE.reshape(-1).tolist()}]}  # fmt: skip
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(_post_json, srv.http_port, "/v2/models/slow/infer", body)
            wait_until(lambda: sample(srv, "fovea_inflight_images") == 1, interval=0.005, what="1 in flight")
            status, answer = _post_json(srv.http_port, "/v2/models/slow/infer", body)
            assert status == 429 and "HTTP requests already in flight" in answer["error"], answer
            assert first.result()[0] == 200
    finally:
        stop_server(srv)


def test_image_headers_are_read_off_the_event_loop(server, monkeypatch) -> None:
    import io
    import threading as th

    from fovea.server import imageinfo
    from PIL import Image

    threads: list[str] = []
    real = imageinfo.read_info

    def spy(data: bytes):
        threads.append(th.current_thread().name)
        return real(data)

    monkeypatch.setattr(imageinfo, "read_info", spy)
    png = io.BytesIO()
    Image.fromarray(IMAGE).save(png, format="PNG")
    with connected_client(server.port) as fovea:
        fovea.predict(png.getvalue(), timeout=30)
    # Before: read on the event loop's thread, where a large GIF or JPEG stalled every RPC.
    assert threads and all(name.startswith("fovea-preprocess") for name in threads), threads


def test_grpc_refuses_calls_beyond_the_concurrent_rpc_limit(models_dir) -> None:
    srv = slow_server(models_dir, max_queue_size=10, max_concurrent_rpcs=2)
    try:
        with connected_client(srv.port) as fovea, ThreadPoolExecutor(2) as pool:
            running = [pool.submit(timed_call, fovea) for _ in range(2)]
            wait_until(
                lambda: sample(srv, "fovea_inflight_images") == 2, interval=0.005, what="2 RPCs running"
            )
            code, _ = timed_call(fovea)  # a third RPC: gRPC refuses it before reading the message
            assert code == "RESOURCE_EXHAUSTED"
            assert [f.result()[0] for f in running] == ["OK", "OK"]
    finally:
        stop_server(srv)


def test_a_folder_larger_than_the_bounds_is_answered_by_an_idle_server(models_dir, tmp_path) -> None:
    # 12 PNGs, sent 8 per request one part after another: each part alone is 4 model calls (2 s),
    # far above the 0.3 s cap and the 3-batch bound. A request's own size never refuses it, and an
    # idle server admits anything within the per-request limits (before, the expected wait counted
    # the request's own compute, so such a folder was refused on every retry).
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(np.full((SIZE, SIZE, 3), i * 20, np.uint8)).save(folder / f"{i:02d}.png")
    srv = slow_server(models_dir, max_queue_size=10, max_queue_wait_ms=300, max_queue_batches=1)
    try:
        with connected_client(srv.port) as fovea:
            predictions = fovea.predict(folder, timeout=60)
        assert len(predictions) == 12
        assert sample(srv, "fovea_shed_requests_total", model="slow") == 0
    finally:
        stop_server(srv)
