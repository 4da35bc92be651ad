"""Answering only when sure, against a real server: fovea.v1, KServe v2 (gRPC and REST), the CLI,
the abstention metric, and the errors for a bad threshold."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the server tests need the server extra")

from _models import export_tiny
from _serving import sample, serving
from conftest import subprocess_env

SIZE = 32
# The tiny random model is unsure of everything (top scores ~0.35-0.5 over 3 classes): an ambiguous image.
THRESHOLD = 0.2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    export_tiny(
        models,
        "sure",
        SIZE,
        calibration={"temperature": 1.0, "threshold": THRESHOLD, "target_precision": 0.99},
    )
    export_tiny(
        models,
        "nothreshold",
        SIZE,
        calibration={"temperature": 1.0, "threshold": None, "target_precision": 0.99},
    )
    with serving(models, max_batch_size=8) as srv:
        yield srv


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def test_fovea_v1_min_score_abstains_and_without_it_answers(server, fovea):
    plain = fovea.predict(image(), model="sure")[0]
    assert not plain.abstained and plain.top[0].score < 0.999
    unsure = fovea.predict(image(), model="sure", min_score=0.999)[0]
    assert unsure.abstained and unsure.top == plain.top  # an abstention still carries the labels
    assert not fovea.predict(image(), model="sure", min_score=plain.top[0].score)[0].abstained
    assert not fovea.predict(image(), model="sure", use_model_threshold=True)[0].abstained
    abstained = sample(
        server, "fovea_thresholded_predictions_total", model="sure", version="1", outcome="abstained"
    )
    answered = sample(
        server, "fovea_thresholded_predictions_total", model="sure", version="1", outcome="answered"
    )
    assert (abstained, answered) == (1.0, 2.0)


def test_bad_thresholds_are_invalid_argument(server, fovea):
    from fovea.client import FoveaError
    from fovea.v1 import classifier_pb2 as pb
    from fovea.v1 import classifier_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = classifier_pb2_grpc.ClassifierServiceStub(ch)
        img = pb.Image(
            raw=pb.RawImage(dtype=pb.DATA_TYPE_UINT8, shape=[SIZE, SIZE, 3], data=image().tobytes())
        )
        for score in (1.5, -0.1, float("nan")):
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(
                    pb.PredictRequest(model_spec=pb.ModelSpec(name="sure"), images=[img], min_score=score)
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "between 0 and 1" in err.value.details()
    with pytest.raises(FoveaError) as err:
        fovea.predict(image(), model="nothreshold", use_model_threshold=True)
    assert err.value.code.name == "INVALID_ARGUMENT"
    assert "no score threshold reached precision 0.99" in err.value.details


def test_kserve_v2_grpc_and_rest_carry_abstained(server):
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (dev extra)")
    batch = np.stack([image(0), image(1)])
    inp = grpcclient.InferInput("images", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch)
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as c:
        result = c.infer("sure", [inp], parameters={"min_score": "0.999"})
        out = result.get_response().outputs[0]
        assert out.parameters["abstained"].string_param == "true,true"
        result = c.infer("sure", [inp])
        assert "abstained" not in result.get_response().outputs[0].parameters
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [1, SIZE, SIZE, 3],
                    "data": image().reshape(-1).tolist(),
                }
            ],
            "parameters": {"use_model_threshold": True},
        }
    ).encode()
    url = f"http://127.0.0.1:{server.http_port}/v2/models/sure/infer"
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=30) as r:
        answer = json.loads(r.read())
    assert answer["outputs"][0]["parameters"]["abstained"] == "false"
    bad = json.loads(body)
    bad["parameters"] = {"min_score": "high"}
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(
            urllib.request.Request(url, data=json.dumps(bad).encode(), method="POST"), timeout=30
        )
    assert err.value.code == 400 and "min_score" in err.value.read().decode()


def test_tf_serving_predict_takes_threshold_inputs_and_answers_abstained(server):
    """TF Serving's PredictRequest has no parameters: the threshold is an extra scalar input, the
    answer an extra DT_BOOL output, present only when a threshold was asked."""
    tf = pytest.importorskip("tensorflow")
    from _serving import channel
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    def predict(**extra):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "sure"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.stack([image(0), image(1)])))
        for key, value in extra.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        with channel(server.port) as ch:
            return prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(request, timeout=30)

    plain = predict()
    assert set(plain.outputs) == {"probabilities"}
    unsure = predict(min_score=np.float32(0.999))
    assert list(unsure.outputs["abstained"].bool_val) == [True, True]
    assert [d.size for d in unsure.outputs["abstained"].tensor_shape.dim] == [2]
    assert unsure.outputs["probabilities"].float_val == plain.outputs["probabilities"].float_val
    assert list(predict(min_score=0.0001).outputs["abstained"].bool_val) == [False, False]  # a double
    assert list(predict(use_model_threshold=True).outputs["abstained"].bool_val) == [False, False]
    for bad, words in (
        ({"min_score": np.float32(1.5)}, "between 0 and 1"),
        ({"min_score": np.array([0.5, 0.6], np.float32)}, "expected one DT_FLOAT or DT_DOUBLE value"),
        ({"use_model_threshold": np.int32(1)}, "expected one DT_BOOL value"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            predict(**bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()


def test_cli_prints_unsure(server, tmp_path):
    from PIL import Image

    path = tmp_path / "ambiguous.png"
    Image.fromarray(image()).save(path)
    base = [
        sys.executable,
        "-m",
        "fovea.cli",
        "predict",
        "--target",
        f"127.0.0.1:{server.port}",
        "--model",
        "sure",
    ]
    env = subprocess_env()
    sure = subprocess.run([*base, str(path)], capture_output=True, text=True, env=env, timeout=120)
    unsure = subprocess.run(
        [*base, "--min-score", "0.999", str(path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert sure.returncode == 0 and unsure.returncode == 0, (sure.stderr, unsure.stderr)
    label = sure.stdout.splitlines()[1].split()[1]  # the row's top label
    assert f"unsure {label}" not in sure.stdout
    assert f"unsure {label}" in unsure.stdout
