"""A real server on port 0 with a real tiny SavedModel: correctness, batching, validation, metadata."""

from __future__ import annotations

import io
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the server tests need the server extra")

from _models import LABELS, export_tiny  # noqa: E402
from _serving import channel, client, sample, start_server, stop_server, wait_serving  # noqa: E402
from fovea.client import FoveaError  # noqa: E402
from fovea.v1 import classifier_pb2 as pb  # noqa: E402
from fovea.v1 import classifier_pb2_grpc  # noqa: E402
from PIL import Image  # noqa: E402

SIZE = 32
MAX_IMAGES = 8
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("models")
    return export_tiny(models, "tiny", SIZE, seed=1)


@pytest.fixture(scope="module")
def server(published):
    srv = start_server(
        published.parents[1],
        max_batch_size=8,
        batch_timeout_ms=20,
        allowed_batch_sizes=(1, 2, 4, 8),
        max_images_per_request=MAX_IMAGES,
        max_pixels=MAX_PIXELS,
        # The batching test sends a burst of 24 two-image requests: 6 batches of 8 at once, beyond
        # the open-loop bound of 3 batches (admission, tested in test_server_overload.py and the
        # simulator), and its client does not retry.
        max_queue_batches=8,
    )
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def stub(server):
    """Raw stubs, for malformed messages the real client refuses to build."""
    with channel(server.port) as ch:
        yield classifier_pb2_grpc.ClassifierServiceStub(ch)


@pytest.fixture(scope="module")
def fovea(server):
    """The real fovea client."""
    with client(server.port) as c:
        wait_serving(c)  # the manager loads in the background; ready means warm
        yield c


@pytest.fixture(scope="module")
def signatures(published):
    loaded = tf.saved_model.load(str(published))
    return loaded, loaded.signatures["serving_default"], loaded.signatures["serving_bytes"]


def reference_pixels(array: np.ndarray) -> np.ndarray:
    """The export contract's preprocessing for raw pixels: to RGB, clip floats, bilinear, round, uint8."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    array = array[:, :, :3]
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255)
    resized = tf.image.resize(array, [SIZE, SIZE], method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8).numpy()


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def raw(array: np.ndarray) -> pb.Image:
    dtype = pb.DATA_TYPE_UINT8 if array.dtype == np.uint8 else pb.DATA_TYPE_FLOAT32
    return pb.Image(
        raw=pb.RawImage(
            dtype=dtype, shape=list(array.shape), data=array.astype(array.dtype.newbyteorder("<")).tobytes()
        )
    )


def test_every_input_kind_matches_the_signature(fovea, signatures, tmp_path) -> None:
    _, by_pixels, by_bytes = signatures
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (45, 27, 3), dtype=np.uint8)
    cases: dict[str, tuple[object, np.ndarray]] = {}

    def by_raw(name: str, array: np.ndarray, sent: object = None) -> None:
        expected = by_pixels(images=tf.constant(reference_pixels(array)[None]))["probabilities"].numpy()[0]
        cases[name] = (array if sent is None else sent, expected)

    def by_encoded(name: str, data: bytes, sent: object = None) -> None:
        expected = by_bytes(image_bytes=tf.constant([data]))["probabilities"].numpy()[0]
        cases[name] = (data if sent is None else sent, expected)

    by_raw("uint8 RGB at the model size", rgb)
    by_raw("uint8 RGB of another size", other)
    by_raw("uint8 grayscale [H, W]", rng.integers(0, 256, (20, 40), dtype=np.uint8))
    by_raw("uint8 grayscale [H, W, 1]", rng.integers(0, 256, (SIZE, SIZE, 1), dtype=np.uint8))
    by_raw("uint8 RGBA", rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8))
    by_raw("float32 RGB at the model size", rng.uniform(-20, 280, (SIZE, SIZE, 3)).astype(np.float32))
    by_raw("float32 RGB of another size", rng.uniform(0, 255, (50, 50, 3)).astype(np.float32))
    by_raw("float32 grayscale", rng.uniform(0, 255, (SIZE, SIZE)).astype(np.float32))
    by_raw("PIL RGB image", other, Image.fromarray(other))
    for fmt, array in [("PNG", other), ("JPEG", other), ("BMP", rgb), ("GIF", other), ("PNG", rgb[:, :, 0])]:
        by_encoded(f"encoded {fmt} {array.shape}", encode(array, fmt))
    by_encoded("encoded RGBA PNG", encode(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), "PNG"))
    jpeg_file = tmp_path / "photo.jpg"
    jpeg_file.write_bytes(encode(rgb, "JPEG"))
    by_encoded("JPEG file path", jpeg_file.read_bytes(), jpeg_file)

    # One call per kind, then every kind in one call (the client splits it into requests of MAX_IMAGES).
    for name, (image, expected) in cases.items():
        (prediction,) = fovea.predict([image], return_probabilities=True)
        np.testing.assert_allclose(prediction.probabilities, expected, atol=1e-5, err_msg=name)
    names = list(cases)
    predictions = fovea.predict([cases[n][0] for n in names], return_probabilities=True)
    for prediction, name in zip(predictions, names, strict=True):
        np.testing.assert_allclose(
            prediction.probabilities, cases[name][1], atol=1e-5, err_msg=f"mixed: {name}"
        )


def test_top_k_labels_and_model_spec(fovea, signatures) -> None:
    _, by_pixels, _ = signatures
    image = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    expected = by_pixels(images=tf.constant(image[None]))["probabilities"].numpy()[0]
    (prediction,) = fovea.predict(image)
    assert (prediction.model_name, prediction.model_version) == ("tiny", 1)
    assert len(prediction.top) == len(LABELS)  # 0 means 5, or every class when there are fewer
    assert prediction.probabilities is None
    assert [c.index for c in prediction.top] == list(np.argsort(-expected, kind="stable"))
    assert [c.label for c in prediction.top] == [LABELS[c.index] for c in prediction.top]
    np.testing.assert_allclose([c.score for c in prediction.top], np.sort(expected)[::-1], atol=1e-5)
    (one,) = fovea.predict(image, top_k=1, model="tiny", version=1)
    assert len(one.top) == 1 and one.top[0].index == int(np.argmax(expected))


def test_concurrent_callers_are_batched_and_get_their_own_rows(server, fovea, signatures) -> None:
    _, by_pixels, _ = signatures
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (48, SIZE, SIZE, 3), dtype=np.uint8)
    expected = by_pixels(images=tf.constant(images))["probabilities"].numpy()
    batches_before = sample(server, "fovea_batches_total", model="tiny")
    images_before = sample(server, "fovea_images_inferred_total", model="tiny")
    barrier = threading.Barrier(24)

    def call(i: int) -> tuple[int, np.ndarray]:
        barrier.wait()
        # Each caller sends two images, so rows from one request must stay together and in order.
        predictions = fovea.predict(images[2 * i : 2 * i + 2], return_probabilities=True)
        return i, np.array([p.probabilities for p in predictions])

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, range(24)))
    for i, got in results:
        np.testing.assert_allclose(got, expected[2 * i : 2 * i + 2], atol=1e-5, err_msg=f"caller {i}")
    batches = sample(server, "fovea_batches_total", model="tiny") - batches_before
    inferred = sample(server, "fovea_images_inferred_total", model="tiny") - images_before
    assert inferred == 48
    assert batches < 24, f"{batches} batches for 24 concurrent requests: nothing was batched"
    # The histogram has observations above 1 image per batch.
    le1 = sample(server, "fovea_batch_size_images_bucket", model="tiny", le="1.0")
    total = sample(server, "fovea_batch_size_images_count", model="tiny")
    assert total - le1 > 0


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _bad_requests() -> dict[str, pb.PredictRequest]:
    ok = np.zeros((SIZE, SIZE, 3), np.uint8)
    good_png = encode(ok, "PNG")
    big = np.zeros((1200, 1200), np.uint8)  # 1.44 MP, over the 1 MP limit, but only ~2 KB as a PNG
    R = pb.PredictRequest
    return {
        "no images": R(),
        "image with neither encoded nor raw": R(images=[pb.Image()]),
        "dtype unspecified": R(images=[pb.Image(raw=pb.RawImage(shape=[SIZE, SIZE, 3], data=ok.tobytes()))]),
        "shape of rank 1": R(images=[pb.Image(raw=pb.RawImage(dtype=1, shape=[3072], data=ok.tobytes()))]),
        "shape of rank 4": R(
            images=[pb.Image(raw=pb.RawImage(dtype=1, shape=[1, SIZE, SIZE, 3], data=ok.tobytes()))]
        ),
        "two channels": R(
            images=[pb.Image(raw=pb.RawImage(dtype=1, shape=[SIZE, 48, 2], data=ok.tobytes()))]
        ),
        "zero height": R(images=[pb.Image(raw=pb.RawImage(dtype=1, shape=[0, SIZE, 3], data=b""))]),
        "data shorter than shape": R(
            images=[pb.Image(raw=pb.RawImage(dtype=1, shape=[SIZE, SIZE, 3], data=b"x" * 10))]
        ),
        "float data of uint8 length": R(
            images=[pb.Image(raw=pb.RawImage(dtype=2, shape=[SIZE, SIZE, 3], data=ok.tobytes()))]
        ),
        "too many images": R(images=[raw(ok)] * (MAX_IMAGES + 1)),
        "too many raw pixels": R(images=[pb.Image(raw=pb.RawImage(dtype=1, shape=[5000, 5000], data=b""))]),
        "PNG bomb (real image)": R(images=[pb.Image(encoded=encode(big, "PNG"))]),
        "PNG bomb (header claims 100k x 100k)": R(
            images=[pb.Image(encoded=_png_header_only(100_000, 100_000))]
        ),
        "not an image": R(images=[pb.Image(encoded=b"this is not an image")]),
        "truncated PNG": R(images=[pb.Image(encoded=good_png[: len(good_png) // 2])]),
        "empty encoded": R(images=[pb.Image(encoded=b"")]),
        "top_k negative": R(images=[raw(ok)], top_k=-1),
        "top_k above classes": R(images=[raw(ok)], top_k=len(LABELS) + 1),
        "negative version": R(images=[raw(ok)], model_spec=pb.ModelSpec(version=-2)),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_input_is_invalid_argument_and_server_keeps_serving(stub, case: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(_bad_requests()[case], timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, info.value.details())
    details = info.value.details()
    assert details and "Traceback" not in details and len(details) < 300, details
    ok = stub.Predict(pb.PredictRequest(images=[raw(np.zeros((SIZE, SIZE, 3), np.uint8))]), timeout=30)
    assert len(ok.predictions) == 1


def _bad_client_inputs() -> dict[str, dict]:
    ok = np.zeros((SIZE, SIZE, 3), np.uint8)
    good_png = encode(ok, "PNG")
    return {
        "PNG bomb (real image)": {"images": encode(np.zeros((1200, 1200), np.uint8), "PNG")},
        "PNG bomb (header claims 100k x 100k)": {"images": _png_header_only(100_000, 100_000)},
        "truncated PNG": {"images": good_png[: len(good_png) // 2]},
        "too many raw pixels": {"images": np.zeros((1001, 1000), np.uint8)},
        "top_k above classes": {"images": ok, "top_k": len(LABELS) + 1},
    }


@pytest.mark.parametrize("case", list(_bad_client_inputs()))
def test_bad_input_through_the_client(fovea, case: str) -> None:
    with pytest.raises(FoveaError) as info:
        fovea.predict(**_bad_client_inputs()[case])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert "Traceback" not in info.value.details
    assert len(fovea.predict(np.zeros((SIZE, SIZE, 3), np.uint8))) == 1


def test_unknown_model_or_version_is_not_found(fovea) -> None:
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    for model, version in (("nope", None), ("tiny", 99), (None, 7)):
        with pytest.raises(FoveaError) as info:
            fovea.predict(image, model=model, version=version)
        assert info.value.code == grpc.StatusCode.NOT_FOUND, (model, version)
        with pytest.raises(FoveaError) as info:
            fovea.metadata(model=model, version=version)
        assert info.value.code == grpc.StatusCode.NOT_FOUND, (model, version)


def test_negative_version_is_invalid_argument_in_every_method(fovea, stub) -> None:
    image = pb.Image(
        raw=pb.RawImage(dtype=pb.DATA_TYPE_UINT8, shape=[SIZE, SIZE, 3], data=bytes(SIZE * SIZE * 3))
    )
    spec = pb.ModelSpec(name="tiny", version=-1)
    for call, request in (
        (stub.Predict, pb.PredictRequest(model_spec=spec, images=[image])),
        (stub.GetModelMetadata, pb.GetModelMetadataRequest(model_spec=spec)),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "model_spec.version" in info.value.details()


def test_core_readiness_and_statistics(server, fovea) -> None:
    """What the KServe v2 adapter will read: readiness per model and version, per-version totals."""
    core = server.core
    assert core.ready and core.model_ready("tiny") and core.model_ready("tiny", 1)
    assert (
        not core.model_ready("tiny", 2) and not core.model_ready("nope") and not core.model_ready("tiny", -1)
    )
    (before,) = core.statistics("tiny")
    fovea.predict([np.zeros((SIZE, SIZE, 3), np.uint8)] * 3)
    (after,) = core.statistics("tiny", 1)
    assert (after.name, after.version) == ("tiny", 1)
    assert after.totals.requests == before.totals.requests + 1
    assert after.totals.images == before.totals.images + 3
    assert after.totals.batches > before.totals.batches and after.totals.compute_s > before.totals.compute_s
    assert after.totals.last_inference > 0
    assert core.statistics("nope") == [] and core.statistics("tiny", 2) == []


def test_metadata_and_list_models(fovea) -> None:
    meta = fovea.metadata()
    assert (meta.name, meta.version) == ("tiny", 1)
    assert list(meta.labels) == list(LABELS)
    assert (meta.input_height, meta.input_width) == (SIZE, SIZE)
    assert meta.backbone == "tiny-cnn" and list(meta.loaded_versions) == [1]
    assert meta.metrics["test_accuracy"] == pytest.approx(0.5)
    assert meta.created_at and meta.max_images_per_request == MAX_IMAGES
    models = fovea.list_models()
    assert [(m.name, list(m.versions), m.ready) for m in models] == [("tiny", [1], True)]


def test_health_reflection_and_request_id(server, fovea) -> None:
    assert fovea.health("") == fovea.health("fovea.v1.ClassifierService") == "SERVING"
    with channel(server.port) as ch:
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {"fovea.v1.ClassifierService", "grpc.health.v1.Health"} <= names
        call_stub = classifier_pb2_grpc.ClassifierServiceStub(ch)
        _, call = call_stub.ListModels.with_call(
            pb.ListModelsRequest(), metadata=(("x-request-id", "test-abc"),), timeout=10
        )
        assert ("x-request-id", "test-abc") in tuple(call.trailing_metadata())


def test_messages_above_4_mib_are_accepted(fovea, signatures) -> None:
    _, by_pixels, _ = signatures
    images = np.random.default_rng(11).integers(0, 256, (4, 700, 700, 3), dtype=np.uint8)  # 5.9 MB in all
    got = np.array([p.probabilities for p in fovea.predict(images, return_probabilities=True)])
    expected = by_pixels(images=tf.constant(np.stack([reference_pixels(im) for im in images])))[
        "probabilities"
    ]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
