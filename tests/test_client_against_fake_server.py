"""fovea.client and its CLI against a real grpc.aio server running a fake ClassifierService.

The fake records every request it receives and answers with probabilities derived from the bytes of
each image, so a test can tell both what arrived and which answer belongs to which image.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from fovea.cli import main as cli_main
from fovea.client import AsyncClient, Client, FoveaError, Prediction, RetryPolicy
from fovea.v1 import classifier_pb2, classifier_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

LABELS = ["cat", "dog", "fox", "owl"]
FAKE_MODEL = "fake"
FAKE_VERSION = 7


def fake_probabilities(image: classifier_pb2.Image) -> np.ndarray:
    """Deterministic probabilities from everything that identifies an image on the wire."""
    digest = hashlib.sha256(image.SerializeToString(deterministic=True)).digest()
    logits = np.frombuffer(digest[: len(LABELS)], dtype=np.uint8).astype(np.float64) / 32.0
    exp = np.exp(logits - logits.max())
    return (exp / exp.sum()).astype(np.float32)


class FakeClassifier(classifier_pb2_grpc.ClassifierServiceServicer):
    """A ClassifierService whose behaviour each test sets, and which records what it received."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: list[classifier_pb2.PredictRequest] = []
        self.predict_calls = 0
        self.metadata_calls = 0
        self.delay = 0.0  # seconds Predict sleeps before answering
        self.fail_first: list[grpc.StatusCode] = []  # codes the next Predict calls fail with
        self.always_fail: grpc.StatusCode | None = None
        self.max_images = 0  # 0: no cap, and GetModelMetadata does not report one
        self.metadata_unimplemented = False
        self.in_flight = 0
        self.max_in_flight = 0  # the most Predict calls the fake was serving at once
        # Versions, as a server with the `latest` policy: `latest` answers version 0, `loaded` may be
        # named. A hot reload is scripted as {n: version}: before the n-th Predict call (from 1) that
        # version becomes the latest, and the old one stays loaded only if `keep_old`.
        self.latest = FAKE_VERSION
        self.loaded = {6, FAKE_VERSION}
        self.reloads: dict[int, int] = {}
        self.reload_before_named_calls = False  # a reload before every call that names a version
        self.keep_old = False

    async def Predict(self, request, context):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._predict(request, context)
        finally:
            self.in_flight -= 1

    async def _predict(self, request, context):
        self.predict_calls += 1
        self.requests.append(request)
        if self.predict_calls in self.reloads:
            self._reload(self.reloads[self.predict_calls])
        elif self.reload_before_named_calls and request.model_spec.version != 0:
            self._reload(self.latest + 1)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_first:
            await context.abort(self.fail_first.pop(0), "injected failure")
        if self.always_fail is not None:
            await context.abort(self.always_fail, "injected failure, always")
        await self._check_model(request.model_spec, context)
        if self.max_images and len(request.images) > self.max_images:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {self.max_images} images")
        if request.top_k > len(LABELS):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"top_k must be 1..{len(LABELS)}")
        k = request.top_k or len(LABELS)
        response = classifier_pb2.PredictResponse(
            model_spec=classifier_pb2.ModelSpec(
                name=FAKE_MODEL, version=request.model_spec.version or self.latest
            )
        )
        for image in request.images:
            probs = fake_probabilities(image)
            order = np.argsort(-probs, kind="stable")[:k]
            prediction = response.predictions.add()
            for i in order:
                prediction.top.add(index=int(i), label=LABELS[i], score=float(probs[i]))
            if request.return_probabilities:
                prediction.probabilities.extend(probs.tolist())
        return response

    async def GetModelMetadata(self, request, context):
        self.metadata_calls += 1
        if self.metadata_unimplemented:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not here")
        await self._check_model(request.model_spec, context)
        return classifier_pb2.GetModelMetadataResponse(
            model_spec=classifier_pb2.ModelSpec(name=FAKE_MODEL, version=FAKE_VERSION),
            labels=LABELS,
            input_height=32,
            input_width=48,
            backbone="resnet50",
            loaded_versions=[6, 7],
            metrics={"test_accuracy": 0.875},
            created_at="2026-01-02T03:04:05Z",
            max_images_per_request=self.max_images,
        )

    async def ListModels(self, request, context):
        return classifier_pb2.ListModelsResponse(
            models=[classifier_pb2.ModelStatus(name=FAKE_MODEL, versions=[6, 7], ready=True)]
        )

    def _reload(self, version: int) -> None:
        self.loaded = {*self.loaded, version} if self.keep_old else {version}
        self.latest = version

    async def _check_model(self, spec: classifier_pb2.ModelSpec, context) -> None:
        if spec.name not in ("", FAKE_MODEL) or spec.version not in (0, *self.loaded):
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model {spec.name!r} version {spec.version} is not served"
            )


class FakeServer:
    """A grpc.aio server on 127.0.0.1:0, run in its own thread and event loop.

    Its own thread, so that blocking Client calls in a test do not stall the loop serving them.
    """

    def __init__(self, port: int = 0) -> None:
        self.servicer = FakeClassifier()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fake-fovea-server", daemon=True)
        self._ready = threading.Event()
        self.port = port  # 0: the OS chooses

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        limit = 64 * 1024 * 1024
        self.server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        )
        classifier_pb2_grpc.add_ClassifierServiceServicer_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("fovea.v1.ClassifierService", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("draining", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    def start(self) -> FakeServer:
        self._thread.start()
        assert self._ready.wait(30), "the fake server did not start"
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def server():
    srv = FakeServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def fake(server: FakeServer) -> FakeClassifier:
    server.servicer.reset()
    return server.servicer


# -- running either client from a plain test ----------------------------------------------------

FAST_RETRIES = RetryPolicy(initial_backoff=0.02, max_backoff=0.2)


def call(kind: str, target: str, method: str, *args: Any, client_kwargs: dict | None = None, **kwargs: Any):
    """Run one call on a fresh Client ("sync") or AsyncClient ("aio", in its own event loop)."""
    client_kwargs = {"retry_policy": FAST_RETRIES, **(client_kwargs or {})}
    if kind == "sync":
        with Client(target, **client_kwargs) as client:
            return getattr(client, method)(*args, **kwargs)

    async def run():
        async with AsyncClient(target, **client_kwargs) as client:
            return await getattr(client, method)(*args, **kwargs)

    return asyncio.run(run())


@pytest.fixture(params=["sync", "aio"])
def kind(request) -> str:
    return request.param


def expect_error(fn: Callable[[], Any]) -> tuple[FoveaError, float]:
    start = time.monotonic()
    with pytest.raises(FoveaError) as info:
        fn()
    return info.value, time.monotonic() - start


# -- inputs ---------------------------------------------------------------------------------------


def _png_bytes(color: tuple[int, int, int], size=(9, 7)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_every_input_kind_arrives_byte_exact(kind: str, server: FakeServer, fake, tmp_path: Path) -> None:
    single = tmp_path / "single.jpg"
    single.write_bytes(_jpeg_bytes(1))
    folder = tmp_path / "folder"
    folder.mkdir()
    folder_files = {
        "b.png": _png_bytes((1, 2, 3)),
        "a.JPG": _jpeg_bytes(2),
        "c.gif": b"GIF89a" + bytes(20),
        "d.bmp": b"BM" + bytes(40),
    }
    for name, data in folder_files.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image")  # skipped: not an image suffix
    (folder / "sub").mkdir()  # skipped: subfolders are not searched
    encoded = _png_bytes((200, 100, 50))
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    nhwc = rng.integers(0, 256, (2, 4, 3, 3), dtype=np.uint8)
    f32 = (rng.random((3, 4, 3)) * 255).astype(np.float32)
    big_endian = f32.astype(">f4")
    gray = rng.integers(0, 256, (4, 5), dtype=np.uint8)
    pil = Image.fromarray(hwc)

    inputs = [str(single), folder, encoded, hwc, nhwc, f32, big_endian, gray, pil]
    results = call(kind, server.target, "predict", inputs, top_k=2)

    images = [image for request in fake.requests for image in request.images]
    expected_encoded = [_jpeg_bytes(1)] + [folder_files[n] for n in ("a.JPG", "b.png", "c.gif", "d.bmp")]
    expected_encoded.append(encoded)
    expected_raw = [
        (classifier_pb2.DATA_TYPE_UINT8, hwc.shape, hwc.tobytes()),
        (classifier_pb2.DATA_TYPE_UINT8, nhwc.shape[1:], nhwc[0].tobytes()),
        (classifier_pb2.DATA_TYPE_UINT8, nhwc.shape[1:], nhwc[1].tobytes()),
        (classifier_pb2.DATA_TYPE_FLOAT32, f32.shape, f32.astype("<f4").tobytes()),
        (classifier_pb2.DATA_TYPE_FLOAT32, f32.shape, f32.astype("<f4").tobytes()),
        (classifier_pb2.DATA_TYPE_UINT8, gray.shape, gray.tobytes()),
        (classifier_pb2.DATA_TYPE_UINT8, hwc.shape, hwc.tobytes()),
    ]
    assert len(images) == len(expected_encoded) + len(expected_raw) == len(results)
    assert [im.encoded for im in images[: len(expected_encoded)]] == expected_encoded
    for image, (dtype, shape, data) in zip(images[len(expected_encoded) :], expected_raw, strict=True):
        assert image.WhichOneof("kind") == "raw"
        assert (image.raw.dtype, tuple(image.raw.shape), image.raw.data) == (dtype, tuple(shape), data)

    sources = [r.source for r in results]
    assert sources[:5] == [str(single)] + [str(folder / n) for n in ("a.JPG", "b.png", "c.gif", "d.bmp")]
    assert sources[5:] == [
        "<bytes 2>",
        "<array 3>",
        "<array 4>[0]",
        "<array 4>[1]",
        "<array 5>",
        "<array 6>",
        "<array 7>",
        "<PIL image 8>",
    ]
    for image, result in zip(images, results, strict=True):
        probs = fake_probabilities(image)
        assert [c.index for c in result.top] == list(np.argsort(-probs, kind="stable")[:2])
        assert result.top[0].label == LABELS[result.top[0].index]
        assert (result.model_name, result.model_version, result.probabilities) == (
            FAKE_MODEL,
            FAKE_VERSION,
            None,
        )


def test_single_inputs_and_float64_are_accepted(server: FakeServer, fake) -> None:
    with Client(server.target) as client:
        (one,) = client.predict(np.zeros((3, 3, 3)), top_k=1)  # float64 -> float32
        assert one.source == "<array>"
        assert fake.requests[-1].images[0].raw.dtype == classifier_pb2.DATA_TYPE_FLOAT32
        assert fake.requests[-1].images[0].raw.data == np.zeros((3, 3, 3), np.float32).tobytes()
        assert len(client.predict(np.zeros((3, 4, 4, 3), np.uint8))) == 3


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("does/not/exist.jpg", "no such file"),
        (b"plain text", "not a JPEG, PNG, GIF or BMP"),
        (np.zeros((2, 2, 2, 2, 3), np.uint8), "must be [H, W]"),
        (np.zeros((4, 4, 7), np.uint8), "channels"),
        (np.zeros((4, 4, 3), np.int64), "dtype int64 is not supported"),
        (42, "unsupported type int"),
        ([], "no images given"),
    ],
)
def test_bad_input_is_invalid_argument_before_any_rpc(kind, server, fake, bad, message) -> None:
    err, _ = expect_error(lambda: call(kind, server.target, "predict", bad))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details
    assert fake.predict_calls == 0 and fake.metadata_calls == 0


def test_empty_folder_names_the_folder(server, fake, tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("x")
    err, _ = expect_error(lambda: call("sync", server.target, "predict", tmp_path))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and str(tmp_path) in err.details


# -- splitting --------------------------------------------------------------------------------------


def _distinct_arrays(n: int, side: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def _assert_answers(arrays: list[np.ndarray], results: list[Prediction]) -> None:
    """Each result carries the fake's probabilities for the array at its position."""
    for array, result in zip(arrays, results, strict=True):
        image = classifier_pb2.Image(
            raw=classifier_pb2.RawImage(
                dtype=classifier_pb2.DATA_TYPE_UINT8, shape=array.shape, data=array.tobytes()
            )
        )
        np.testing.assert_allclose(result.probabilities, fake_probabilities(image), rtol=1e-6)


def _assert_in_order(fake: FakeClassifier, arrays: list[np.ndarray], results: list[Prediction]) -> None:
    # The aio client sends sub-requests concurrently, so they may arrive in any order.
    received = [image.raw.data for request in fake.requests for image in request.images]
    assert sorted(received) == sorted(a.tobytes() for a in arrays)
    assert [r.source for r in results] == [f"<array {i}>" for i in range(len(arrays))]
    _assert_answers(arrays, results)


def test_split_by_message_size_keeps_order(kind, server, fake) -> None:
    arrays = _distinct_arrays(11)  # 4800 bytes each
    limit = 16_000
    results = call(
        kind,
        server.target,
        "predict",
        arrays,
        return_probabilities=True,
        client_kwargs={"max_message_bytes": limit, "max_images_per_request": 100},
    )
    assert len(fake.requests) >= 4
    assert all(r.ByteSize() <= limit for r in fake.requests)
    _assert_in_order(fake, arrays, results)


def test_split_by_the_servers_image_limit_keeps_order(kind, server, fake) -> None:
    fake.max_images = 3  # enforced by the fake's Predict and reported by its GetModelMetadata
    arrays = _distinct_arrays(8, side=8)
    results = call(kind, server.target, "predict", arrays, return_probabilities=True)
    assert [len(r.images) for r in fake.requests] == [3, 3, 2]
    assert fake.metadata_calls == 1
    _assert_in_order(fake, arrays, results)


def test_image_limit_falls_back_when_metadata_is_unimplemented(server, fake) -> None:
    fake.metadata_unimplemented = True
    arrays = _distinct_arrays(70, side=4)
    results = call("sync", server.target, "predict", arrays, return_probabilities=True)
    assert [len(r.images) for r in fake.requests] == [64, 6]
    _assert_in_order(fake, arrays, results)


async def test_async_client_sends_sub_requests_concurrently(server, fake) -> None:
    fake.delay = 0.3
    arrays = _distinct_arrays(8, side=8)
    async with AsyncClient(server.target, max_images_per_request=2, max_concurrent_requests=4) as client:
        results = await client.predict(arrays, return_probabilities=True, timeout=5)
    # Sub-requests may complete in any order; what is asserted is that results come back in input order.
    assert len(fake.requests) == 4
    assert fake.max_in_flight >= 2  # the sub-requests overlapped on the server
    received = {im.raw.data for r in fake.requests for im in r.images}
    assert received == {a.tobytes() for a in arrays}
    _assert_answers(arrays, results)


# -- a call split into several requests is answered by one model version ---------------------------------


IN_TWOS = {"max_images_per_request": 2}  # client arguments that split a call into parts of two images


def _pinned_versions(fake: FakeClassifier) -> list[int]:
    """The versions the requests of the last start of a call named (0: none, the first part)."""
    versions = [r.model_spec.version for r in fake.requests]
    return versions[len(versions) - 1 - versions[::-1].index(0) :]


@pytest.mark.parametrize("keep_old", [True, False], ids=["old-version-kept", "old-version-retired"])
def test_split_call_is_answered_by_one_version_across_a_hot_reload(kind, server, fake, keep_old) -> None:
    fake.latest, fake.loaded, fake.keep_old = 6, {6}, keep_old
    fake.reloads = {2: 7}  # version 7 replaces 6 as soon as the first part has been answered
    arrays = _distinct_arrays(6, side=4)
    results = call(kind, server.target, "predict", arrays, return_probabilities=True, client_kwargs=IN_TWOS)
    assert [r.source for r in results] == [f"<array {i}>" for i in range(6)]
    if keep_old:
        # The parts after the first asked for version 6, which still answers.
        assert {r.model_version for r in results} == {6}
        assert [r.model_spec.version for r in fake.requests] == [0, 6, 6]
    else:
        # Version 6 was retired before the other parts were answered: the call started over on 7.
        assert {r.model_version for r in results} == {7}
        assert fake.requests[0].model_spec.version == 0
        assert _pinned_versions(fake) == [0, 7, 7]
        assert sum(r.model_spec.version == 0 for r in fake.requests) == 2
    _assert_answers(arrays, results)


def test_split_call_stops_when_every_start_meets_a_reload(kind, server, fake) -> None:
    fake.reload_before_named_calls = True  # each pinned part finds its version just retired
    err, _ = expect_error(
        lambda: call(kind, server.target, "predict", _distinct_arrays(4, side=4), client_kwargs=IN_TWOS)
    )
    assert err.code == grpc.StatusCode.ABORTED
    assert "retired before the other parts" in err.details and "NOT_FOUND" in err.details
    assert sum(r.model_spec.version == 0 for r in fake.requests) == 3  # three starts, then it stops


def test_a_named_version_is_not_pinned_again(kind, server, fake) -> None:
    fake.reloads = {2: 8}
    fake.keep_old = True
    arrays = _distinct_arrays(4, side=4)
    results = call(kind, server.target, "predict", arrays, version=6, client_kwargs=IN_TWOS)
    assert {r.model_version for r in results} == {6}
    assert [r.model_spec.version for r in fake.requests] == [6, 6]


def test_an_image_larger_than_one_message_fails_before_sending(kind, server, fake) -> None:
    big = np.zeros((100, 100, 3), np.uint8)  # 30 000 bytes
    err, _ = expect_error(
        lambda: call(kind, server.target, "predict", [big], client_kwargs={"max_message_bytes": 20_000})
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "<array 0>" in err.details and "20000" in err.details
    assert fake.predict_calls == 0


# -- deadlines and retries ----------------------------------------------------------------------------


def test_deadline_is_respected(kind, server, fake) -> None:
    fake.delay = 10.0
    err, elapsed = expect_error(
        lambda: call(kind, server.target, "predict", b"GIF89a" + bytes(8), timeout=0.5)
    )
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.4 < elapsed < 3.0


def test_timeout_must_be_finite_and_positive(server, fake) -> None:
    with Client(server.target) as client:
        for bad in (0, -1, float("inf"), float("nan"), "3"):
            with pytest.raises(FoveaError) as info:
                client.list_models(timeout=bad)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert client.default_timeout == 30.0  # timeout=None means this, never "forever"


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_retries_until_success(kind, server, fake, code) -> None:
    fake.fail_first = [code, code]
    (result,) = call(kind, server.target, "predict", b"GIF89a" + bytes(8), timeout=5)
    assert fake.predict_calls == 3
    assert result.model_name == FAKE_MODEL


def test_retries_stop_at_the_deadline(kind, server, fake) -> None:
    fake.always_fail = grpc.StatusCode.UNAVAILABLE
    timeout = 1.0
    err, elapsed = expect_error(lambda: call(kind, server.target, "predict", b"GIF89a", timeout=timeout))
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "UNAVAILABLE" in err.details
    assert fake.predict_calls >= 3
    assert timeout * 0.9 < elapsed < timeout + 1.5


def test_max_attempts_limits_retries(server, fake) -> None:
    fake.always_fail = grpc.StatusCode.UNAVAILABLE
    policy = RetryPolicy(initial_backoff=0.01, max_attempts=2)
    err, _ = expect_error(
        lambda: call("sync", server.target, "predict", b"GIF89a", client_kwargs={"retry_policy": policy})
    )
    assert err.code == grpc.StatusCode.UNAVAILABLE and fake.predict_calls == 2


def test_other_errors_are_not_retried(kind, server, fake) -> None:
    fake.fail_first = [grpc.StatusCode.INTERNAL]
    err, _ = expect_error(lambda: call(kind, server.target, "predict", b"GIF89a"))
    assert err.code == grpc.StatusCode.INTERNAL and fake.predict_calls == 1


def test_unreachable_server_is_retried_until_the_deadline(kind) -> None:
    err, elapsed = expect_error(lambda: call(kind, "127.0.0.1:1", "list_models", timeout=0.6))
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED, err
    attempts = re.search(r"after (\d+) attempt\(s\); last error: UNAVAILABLE", err.details)
    assert attempts and int(attempts.group(1)) >= 2, err.details
    assert elapsed < 3.0


@dataclasses.dataclass(frozen=True)
class _StartServerOnFirstRetry(RetryPolicy):
    """FAST_RETRIES that starts `late` when the first attempt has failed, and counts the retries."""

    late: Any = None
    retries: list = dataclasses.field(default_factory=list)

    def backoff(self, retry: int, rng=None) -> float:
        if not self.retries:
            self.late.start()
        self.retries.append(retry)
        return super().backoff(retry, rng)


def test_a_server_that_starts_after_the_first_attempt_is_reached_by_retrying(kind) -> None:
    with socket.socket() as probe:  # a port nothing listens on until the first attempt has failed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    late = FakeServer(port)
    policy = _StartServerOnFirstRetry(initial_backoff=0.02, max_backoff=0.2, late=late)
    try:
        (result,) = call(
            kind,
            f"127.0.0.1:{port}",
            "predict",
            b"GIF89a" + bytes(8),
            timeout=20,
            client_kwargs={"retry_policy": policy},
        )
    finally:
        if late._ready.is_set():
            late.stop()
    assert result.model_name == FAKE_MODEL
    assert len(policy.retries) >= 1  # the first attempt failed: nothing listened yet
    assert late.servicer.predict_calls == 1  # and a retry, not the first attempt, reached the server


# -- status codes, metadata, models, health --------------------------------------------------------------


def test_errors_carry_the_servers_status_code(kind, server, fake) -> None:
    err, _ = expect_error(lambda: call(kind, server.target, "predict", b"GIF89a", model="nope"))
    assert err.code == grpc.StatusCode.NOT_FOUND and "'nope'" in err.details
    assert str(err).startswith("NOT_FOUND: ")
    err, _ = expect_error(lambda: call(kind, server.target, "predict", b"GIF89a", top_k=9))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in err.details
    err, _ = expect_error(lambda: call(kind, server.target, "metadata", version=99))
    assert err.code == grpc.StatusCode.NOT_FOUND


def test_metadata_and_list_models(kind, server, fake) -> None:
    meta = call(kind, server.target, "metadata", model=FAKE_MODEL)
    assert (meta.name, meta.version, meta.labels) == (FAKE_MODEL, FAKE_VERSION, tuple(LABELS))
    assert (meta.input_height, meta.input_width, meta.backbone) == (32, 48, "resnet50")
    assert meta.loaded_versions == (6, 7) and meta.metrics == {"test_accuracy": 0.875}
    (status,) = call(kind, server.target, "list_models")
    assert (status.name, status.versions, status.ready) == (FAKE_MODEL, (6, 7), True)


def test_health(kind, server) -> None:
    assert call(kind, server.target, "health") == "SERVING"
    assert call(kind, server.target, "health", "fovea.v1.ClassifierService") == "SERVING"
    assert call(kind, server.target, "health", "draining") == "NOT_SERVING"
    err, _ = expect_error(lambda: call(kind, server.target, "health", "no.such.Service"))
    assert err.code == grpc.StatusCode.NOT_FOUND


def test_channel_options_and_closed_client(server) -> None:
    from fovea.client import _common

    options = dict(_common.channel_options(123, None))
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == 123
    assert json.loads(options["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    client = Client(server.target)
    client.close()
    with pytest.raises(FoveaError) as info:
        client.health()
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_round_robin_dns_target_reaches_the_server(server) -> None:
    with Client(f"dns:///localhost:{server.port}") as client:
        # localhost may resolve to ::1 first, where nothing listens; round robin still reaches 127.0.0.1.
        assert client.health(timeout=5) == "SERVING"


# -- the CLI ------------------------------------------------------------------------------------------


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        (folder / f"img{i}.png").write_bytes(_png_bytes(color))
    return folder


def test_cli_predict_table(server, fake, images_dir: Path, capsys) -> None:
    rc = cli_main(["predict", "--target", server.target, "--top-k", "2", str(images_dir)])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["FILE", "TOP", "1", "TOP", "2"]
    for i, line in enumerate(lines[1:4]):
        image = classifier_pb2.Image(encoded=(images_dir / f"img{i}.png").read_bytes())
        probs = fake_probabilities(image)
        best = int(np.argmax(probs))
        assert line.startswith(str(images_dir / f"img{i}.png"))
        assert f"{LABELS[best]} {probs[best]:.3f}" in line
    # The columns line up: every row's second column starts where the header's does.
    col = lines[0].index("TOP 1")
    assert all(line[col - 2 : col] == "  " and line[col] != " " for line in lines[1:4])
    assert lines[4] == f"model: {FAKE_MODEL} version {FAKE_VERSION}"


def test_cli_predict_json(server, fake, images_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FOVEA_TARGET", server.target)  # --target defaults to $FOVEA_TARGET
    rc = cli_main(["predict", "--json", "--top-k", "3", str(images_dir / "img1.png")])
    assert rc == 0
    (doc,) = json.loads(capsys.readouterr().out)
    assert doc["source"] == str(images_dir / "img1.png")
    assert (doc["model_name"], doc["model_version"]) == (FAKE_MODEL, FAKE_VERSION)
    assert len(doc["top"]) == 3 and set(doc["top"][0]) == {"index", "label", "score"}


def test_cli_health_metadata_models(server, fake, capsys) -> None:
    assert cli_main(["health", "--target", server.target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert cli_main(["health", "--target", server.target, "--service", "draining"]) == 1
    assert capsys.readouterr().out.strip() == "NOT_SERVING"
    assert cli_main(["metadata", "--target", server.target]) == 0
    out = capsys.readouterr().out
    assert "resnet50" in out and "cat, dog, fox, owl" in out and "32x48" in out
    assert cli_main(["metadata", "--json", "--target", server.target]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == LABELS
    assert cli_main(["models", "--target", server.target]) == 0
    assert capsys.readouterr().out.split() == ["MODEL", "VERSIONS", "READY", FAKE_MODEL, "6,7", "yes"]


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fovea.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for text in expected:
        assert text in lines[0]


def test_cli_bad_path_is_one_line(server, fake, fovea_env, tmp_path: Path) -> None:
    proc = _run_cli(["predict", "--target", server.target, str(tmp_path / "missing.jpg")], fovea_env)
    _assert_one_line_error(proc, "missing.jpg", "no such file")
    assert fake.predict_calls == 0


def test_cli_unreachable_server_is_one_line(fovea_env, images_dir: Path) -> None:
    proc = _run_cli(["predict", "--target", "127.0.0.1:1", "--timeout", "1", str(images_dir)], fovea_env)
    _assert_one_line_error(proc, "127.0.0.1:1", "UNAVAILABLE")


def test_cli_server_error_is_one_line(server, fake, fovea_env, images_dir: Path) -> None:
    proc = _run_cli(["predict", "--target", server.target, "--model", "nope", str(images_dir)], fovea_env)
    _assert_one_line_error(proc, "NOT_FOUND", "'nope'")
    proc = _run_cli(["metadata", "--target", server.target, "--version", "99"], fovea_env)
    _assert_one_line_error(proc, "NOT_FOUND")


def test_cli_predict_does_not_import_tensorflow(fovea_env) -> None:
    code = (
        "import sys; from fovea.cli import build_parser; build_parser('predict'); "
        "import fovea.client.client_commands; print('tensorflow' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=fovea_env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
