"""Every protocol rides the same batcher: fovea.v1, v2 gRPC, v2 REST and TF Serving in one batch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the server tests need the server extra")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (dev extra)")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (dev extra)")
pytest.importorskip(
    "tensorflow_serving.apis", reason="tensorflow-serving-api is not installed (server extra)"
)

from _models import export_tiny  # noqa: E402
from _serving import client, sample, serving  # noqa: E402
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

SIZE = 16
MODEL = "mixed"


def test_four_protocols_share_one_batch(tmp_path) -> None:
    export_tiny(tmp_path, MODEL, SIZE, seed=8)
    # A batch runs when 4 images are queued or 30 s after the first: the four calls below arrive
    # together, so they fill one batch long before the timeout.
    image = np.random.default_rng(1).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    with serving(tmp_path, max_batch_size=4, batch_timeout_ms=30_000) as srv, client(srv.port) as fovea:
        batches = sample(srv, "fovea_batches_total", model=MODEL)

        def v1() -> np.ndarray:
            (p,) = fovea.predict(image, model=MODEL, return_probabilities=True, timeout=60)
            return np.array(p.probabilities, dtype=np.float32)

        def v2_grpc() -> np.ndarray:
            c = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.port}")
            inp = grpcclient.InferInput("images", list(image.shape), "UINT8")
            inp.set_data_from_numpy(image)
            return c.infer(MODEL, [inp], client_timeout=60).as_numpy("probabilities")[0]

        def v2_http() -> np.ndarray:
            c = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http_port}", network_timeout=60)
            inp = httpclient.InferInput("images", list(image.shape), "UINT8")
            inp.set_data_from_numpy(image)
            return c.infer(MODEL, [inp]).as_numpy("probabilities")[0]

        def tf_serving() -> np.ndarray:
            with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                request = predict_pb2.PredictRequest()
                request.model_spec.name = MODEL
                request.inputs["images"].CopyFrom(tf.make_tensor_proto(image))
                response = prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(request, timeout=60)
                return tf.make_ndarray(response.outputs["probabilities"])[0]

        with ThreadPoolExecutor(4) as pool:
            results = [f.result() for f in [pool.submit(fn) for fn in (v1, v2_grpc, v2_http, tf_serving)]]
        assert sample(srv, "fovea_batches_total", model=MODEL) == batches + 1
        for result in results[1:]:
            np.testing.assert_allclose(result, results[0], atol=1e-6)
