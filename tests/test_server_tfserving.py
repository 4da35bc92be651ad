"""TF Serving's API: the real tensorflow-serving-api stubs against a real server.

Answers are compared with fovea.v1 Predict on the same images from the same server.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the server tests need the server extra")
pytest.importorskip(
    "tensorflow_serving.apis", reason="tensorflow-serving-api is not installed (server extra)"
)

from _models import LABELS, export_tiny  # noqa: E402
from _serving import client, sample, serving  # noqa: E402
from PIL import Image  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

SIZE = 24
MODEL = "shapes"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    export_tiny(models, MODEL, SIZE, seed=4)
    export_tiny(models, MODEL, SIZE, seed=5)  # two versions, both served
    with serving(models, version_policy="all", max_images_per_request=8) as srv, client(srv.port) as c:
        assert c.list_models(timeout=10)[0].versions == (1, 2)
        yield srv


@pytest.fixture(scope="module")
def fovea(server):
    with client(server.port) as c:
        yield c


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def predictor(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def images(count: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def jpegs(array: np.ndarray) -> list[bytes]:
    out = []
    for image in array:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def reference(fovea, inputs, version: int = 0) -> tuple[np.ndarray, list]:
    predictions = fovea.predict(inputs, model=MODEL, version=version, return_probabilities=True)
    return (
        np.array([p.probabilities for p in predictions], dtype=np.float32),
        [[(c.label, c.score) for c in p.top] for p in predictions],
    )


def predict_request(version: int | None = None, signature: str = "") -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    return request


def probabilities(response: predict_pb2.PredictResponse) -> np.ndarray:
    return tf.make_ndarray(response.outputs["probabilities"])


def test_predict_uint8_tensor_content_and_int_val(server, predictor, fovea) -> None:
    before = sample(server, "fovea_requests_total", protocol="tf-serving", method="Predict", code="OK")
    batch = images(3, seed=1)
    want, _ = reference(fovea, batch, version=1)
    request = predict_request(version=1)
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(batch))  # tensor_content
    response = predictor.Predict(request, timeout=30)
    np.testing.assert_allclose(probabilities(response), want, atol=1e-6)
    assert (response.model_spec.name, response.model_spec.version.value) == (MODEL, 1)
    assert response.model_spec.signature_name == "serving_default"

    # int_val: one int32 per uint8; only the low byte counts.
    request = predict_request(version=1, signature="serving_default")
    tensor = request.inputs["images"]
    tensor.dtype = tf.uint8.as_datatype_enum
    tensor.tensor_shape.CopyFrom(tf.TensorShape(batch.shape).as_proto())
    tensor.int_val.extend((batch.reshape(-1).astype(np.int32) + 256).tolist())
    np.testing.assert_allclose(probabilities(predictor.Predict(request, timeout=30)), want, atol=1e-6)
    assert (
        sample(server, "fovea_requests_total", protocol="tf-serving", method="Predict", code="OK")
        == before + 2
    )


def test_predict_encoded_strings_newest_version_and_filter(predictor, fovea) -> None:
    blobs = jpegs(images(2, size=50, seed=2))
    want, _ = reference(fovea, blobs)
    request = predict_request(signature="serving_bytes")
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(blobs, dtype=tf.string))
    request.output_filter.append("probabilities")
    response = predictor.Predict(request, timeout=30)
    np.testing.assert_allclose(probabilities(response), want, atol=1e-6)
    assert response.model_spec.version.value == 2  # no version: the newest
    # version_label "latest" is the newest too; bytes also go to serving_default.
    request = predict_request()
    request.model_spec.version_label = "latest"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(blobs, dtype=tf.string))
    np.testing.assert_allclose(probabilities(predictor.Predict(request, timeout=30)), want, atol=1e-6)


def test_classify_examples_give_the_top_k(predictor, fovea) -> None:
    blobs = jpegs(images(2, seed=3))
    _, want_top = reference(fovea, blobs)
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    for blob in blobs:
        example = request.input.example_list.examples.add()
        example.features.feature["image_bytes"].bytes_list.value.append(blob)
    response = predictor.Classify(request, timeout=30)
    got = [[(c.label, c.score) for c in cls.classes] for cls in response.result.classifications]
    assert [[label for label, _ in row] for row in got] == [[label for label, _ in row] for row in want_top]
    np.testing.assert_allclose(
        [[s for _, s in row] for row in got], [[s for _, s in row] for row in want_top], atol=1e-6
    )


def test_get_model_metadata_signature_defs(predictor) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL
    response = predictor.GetModelMetadata(request, timeout=30)
    defs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(defs)
    images_sig, bytes_sig = defs.signature_def["serving_default"], defs.signature_def["serving_bytes"]
    assert images_sig.method_name == "tensorflow/serving/predict"
    assert [d.size for d in images_sig.inputs["images"].tensor_shape.dim] == [-1, SIZE, SIZE, 3]
    assert images_sig.inputs["images"].dtype == tf.uint8.as_datatype_enum
    assert [d.size for d in bytes_sig.inputs["image_bytes"].tensor_shape.dim] == [-1]
    assert [d.size for d in bytes_sig.outputs["probabilities"].tensor_shape.dim] == [-1, len(LABELS)]
    with pytest.raises(grpc.RpcError) as err:
        predictor.GetModelMetadata(
            get_model_metadata_pb2.GetModelMetadataRequest(model_spec=request.model_spec), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_get_model_status_lists_every_version_available(channel) -> None:
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL
    response = stub.GetModelStatus(request, timeout=30)
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert [(s.version, s.state) for s in response.model_version_status] == [(1, available), (2, available)]


@pytest.mark.parametrize(
    ("edit", "code", "fragment"),
    [
        (
            lambda r: r.inputs["pixels"].CopyFrom(tf.make_tensor_proto(images(1))),
            "INVALID_ARGUMENT",
            "'pixels'",
        ),
        (
            lambda r: r.inputs["images"].CopyFrom(tf.make_tensor_proto(images(1, size=8))),
            "INVALID_ARGUMENT",
            "[1, 8, 8, 3]",
        ),
        (
            lambda r: r.inputs["images"].CopyFrom(tf.make_tensor_proto(images(1).astype(np.float32))),
            "INVALID_ARGUMENT",
            "DT_FLOAT",
        ),
        (
            lambda r: r.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([b"junk"])),
            "INVALID_ARGUMENT",
            "JPEG",
        ),
        (lambda r: setattr(r.model_spec, "name", "nope"), "NOT_FOUND", "nope"),
        (lambda r: r.model_spec.version.__setattr__("value", 9), "NOT_FOUND", "9"),
        (lambda r: setattr(r.model_spec, "signature_name", "other"), "INVALID_ARGUMENT", "serving_bytes"),
        (lambda r: r.output_filter.append("logits"), "INVALID_ARGUMENT", "'logits'"),
    ],
)
def test_bad_predict_requests(predictor, edit, code: str, fragment: str) -> None:
    request = predict_request()
    edit(request)
    if not request.inputs:
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images(1)))
    with pytest.raises(grpc.RpcError) as err:
        predictor.Predict(request, timeout=30)
    assert err.value.code() == grpc.StatusCode[code], err.value.details()
    assert fragment in err.value.details(), err.value.details()
