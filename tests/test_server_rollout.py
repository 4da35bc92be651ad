"""Rollouts against a real server with three versions: labels on fovea.v1, TF Serving and KServe v2,
traffic shares, sticky routing keys, shadow agreement, a bad rollout file and a label of a removed version.
"""

from __future__ import annotations

import json
import math
import shutil
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the server tests need the server extra")

from _models import export_tiny
from _serving import sample, serving, wait_until
from fovea.contract import rollout as rollout_file
from fovea.v1 import classifier_pb2 as pb
from fovea.v1 import classifier_pb2_grpc

MODEL = "tiny"
SIZE = 16
KEY = rollout_file.ROUTE_KEY_HEADER


def write(models, **data) -> None:
    rollout_file.write(str(models / MODEL), rollout_file.validate(data))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    for seed in (1, 2, 3):
        export_tiny(models, MODEL, SIZE, seed=seed)
    return models


@pytest.fixture(scope="module")
def server(models):
    # --version-policy latest would serve only 3: the versions the rollout file names stay loaded.
    write(models, labels={"stable": 1, "canary": 2})
    with serving(models, version_policy="latest") as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield classifier_pb2_grpc.ClassifierServiceStub(ch)


def labels_of(stub) -> dict[str, int]:
    return dict(stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0].version_labels)


def settle(stub, models, **data) -> None:
    """Write the file and wait until the server reports its labels (one poll)."""
    write(models, **data)
    wait_until(lambda: labels_of(stub) == data["labels"], timeout=30, what="labels polled")


def image() -> pb.Image:
    data = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8).tobytes()
    return pb.Image(raw=pb.RawImage(dtype=pb.DATA_TYPE_UINT8, shape=[SIZE, SIZE, 3], data=data))


def predict(stub, label: str = "", version: int = 0, key: str = "") -> int:
    request = pb.PredictRequest(model_spec=pb.ModelSpec(name=MODEL, version=version, version_label=label))
    request.images.append(image())
    metadata = ((KEY, key),) if key else None
    return stub.Predict(request, timeout=30, metadata=metadata).model_spec.version


def test_pinned_versions_stay_loaded_and_labels_are_listed(server, stub, models):
    settle(stub, models, labels={"stable": 1, "canary": 2})
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0]
    assert list(listed.versions) == [1, 2, 3]  # 3 by the policy, 1 and 2 by the file
    meta = stub.GetModelMetadata(
        pb.GetModelMetadataRequest(model_spec=pb.ModelSpec(name=MODEL, version_label="canary")), timeout=10
    )
    assert meta.model_spec.version == 2
    assert dict(meta.version_labels) == {"stable": 1, "canary": 2}


def test_labels_on_three_protocols(server, stub, models):
    settle(stub, models, labels={"stable": 1, "canary": 2})
    assert predict(stub, "canary") == 2
    assert predict(stub, "stable") == 1
    assert predict(stub) == 3  # no traffic shares: the newest, as without a file

    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    tf_request = predict_pb2.PredictRequest()
    tf_request.model_spec.name = MODEL
    tf_request.model_spec.version_label = "canary"
    pixels = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    tf_request.inputs["images"].dtype = 4  # DT_UINT8
    for d in pixels.shape:
        tf_request.inputs["images"].tensor_shape.dim.add(size=d)
    tf_request.inputs["images"].tensor_content = pixels.tobytes()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        tfs = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        assert tfs.Predict(tf_request, timeout=30).model_spec.version.value == 2
        tf_request.model_spec.version_label = "nope"
        with pytest.raises(grpc.RpcError) as err:
            tfs.Predict(tf_request, timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, SIZE, SIZE, 3],
                        "data": [0] * (SIZE * SIZE * 3)}]}  # fmt: skip
    url = f"http://127.0.0.1:{server.http_port}/v2/models/{MODEL}/versions/stable/infer"
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as response:
        assert json.load(response)["model_version"] == "1"
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/repository/index", b"{}") as r:
        rows = json.load(r)
    assert rows[0]["version_labels"] == {"canary": "2", "stable": "1"}


def test_unknown_label_and_version_with_label_are_refused(server, stub, models):
    settle(stub, models, labels={"stable": 1, "canary": 2})
    with pytest.raises(grpc.RpcError) as err:
        predict(stub, "blue")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "canary, stable" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        predict(stub, "stable", version=1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_traffic_shares_and_sticky_keys(server, stub, models):
    settle(stub, models, labels={"stable": 1, "canary": 2}, traffic={"stable": 80, "canary": 20})
    n = 300
    canary = sum(predict(stub) == 2 for _ in range(n))
    sigma = math.sqrt(n * 0.2 * 0.8)
    assert abs(canary - 0.2 * n) <= 4 * sigma, canary  # binomial, 4 sigma: cannot flake in practice
    for key in ("user-1", "user-2", "user-3", "user-42"):
        seen = {predict(stub, key=key) for _ in range(10)}
        assert len(seen) == 1, (key, seen)
    # keys spread over both sides too (sha256 buckets; these 40 keys are fixed, so this is deterministic)
    assert {predict(stub, key=f"k{i}") for i in range(40)} == {1, 2}
    # the per-version metrics count each side
    assert sample(server, "fovea_version_predictions_total", model=MODEL, version="2", label="canary",
                  code="OK") >= canary  # fmt: skip


def test_shadow_on_the_same_version_agrees_fully(server, stub, models):
    settle(stub, models, labels={"stable": 1}, traffic={"stable": 1}, shadow={"version": 1, "share": 1.0})
    labels = {"model": MODEL, "version": "1"}
    before = sample(server, "fovea_shadow_images_total", **labels)
    equal_before = sample(server, "fovea_shadow_top1_equal_total", **labels)
    for _ in range(5):
        assert predict(stub) == 1
    wait_until(lambda: sample(server, "fovea_shadow_requests_total", **labels, outcome="computed")
               + sample(server, "fovea_shadow_requests_total", **labels, outcome="dropped_busy") >= 5,
               timeout=30, what="5 shadow runs")  # fmt: skip
    computed = sample(server, "fovea_shadow_images_total", **labels) - before
    assert computed >= 1  # sequential requests leave the queue empty: most are computed
    assert sample(server, "fovea_shadow_top1_equal_total", **labels) - equal_before == computed
    assert sample(server, "fovea_shadow_score_abs_diff_sum_total", **labels) < 1e-5


def test_bad_file_keeps_the_last_good_one(server, stub, models):
    settle(stub, models, labels={"stable": 1, "canary": 2})
    errors = sample(server, "fovea_rollout_file_errors_total", model=MODEL)
    (models / MODEL / "rollout.json").write_text('{"labels": {"stable": 0}}')
    wait_until(lambda: sample(server, "fovea_rollout_file_errors_total", model=MODEL) > errors, timeout=30)
    assert labels_of(stub) == {"stable": 1, "canary": 2}
    assert predict(stub, "canary") == 2


def test_label_of_a_removed_version_is_failed_precondition(server, stub, models, tmp_path):
    settle(stub, models, labels={"stable": 1, "canary": 2})
    # Move version 2 away (as an operator deleting it would): the label now names nothing loaded.
    shutil.move(str(models / MODEL / "2"), str(tmp_path / "2"))
    try:
        wait_until(lambda: 2 not in stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0].versions,
                   timeout=30, what="version 2 unloaded")  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            predict(stub, "canary")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "version 2" in err.value.details()
    finally:
        shutil.move(str(tmp_path / "2"), str(models / MODEL / "2"))


def test_cli_status_reads_the_servers_figures(server, stub, models, capsys):
    from fovea.cli import main

    settle(stub, models, labels={"stable": 1}, traffic={"stable": 1}, shadow={"version": 1, "share": 1.0})
    predict(stub)
    wait_until(lambda: sample(server, "fovea_shadow_images_total", model=MODEL, version="1"), timeout=30)
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    assert main(["rollout", str(models / MODEL), "--metrics", url]) == 0
    out = capsys.readouterr().out
    assert "label stable       version 1     traffic 100.0%" in out
    assert "shadow version 1:" in out and "top-1 agreement 100.00%" in out


def test_python_clients_send_label_and_route_key(server, stub, models):
    import asyncio

    from fovea.client import AsyncClient, Client, FoveaError

    settle(stub, models, labels={"stable": 1, "canary": 2}, traffic={"stable": 80, "canary": 20})
    # An earlier test moves version 2 away and back: it may still be loading again.
    wait_until(lambda: 2 in stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0].versions,
               timeout=60, what="version 2 loaded")  # fmt: skip
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    target = f"127.0.0.1:{server.port}"
    # Which side each key lands on, as the server routes it (fovea.v1 with the header set by hand).
    sides = {f"k{i}": predict(stub, key=f"k{i}") for i in range(40)}
    assert set(sides.values()) == {1, 2}  # fixed keys, sha256 buckets: deterministic
    with Client(target) as client:
        assert client.predict(pixels, model=MODEL, version_label="canary")[0].model_version == 2
        assert client.predict(pixels, model=MODEL, version_label="stable")[0].model_version == 1
        for key, version in sides.items():
            assert client.predict(pixels, model=MODEL, route_key=key)[0].model_version == version, key
        with pytest.raises(FoveaError) as err:
            client.predict(pixels, model=MODEL, version_label="blue")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(FoveaError) as err:
            client.predict(pixels, model=MODEL, version=1, version_label="stable")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # A split call (one image per request) under a label: the later parts are pinned to the version
    # that answered the first, without the label (a request naming both is refused).
    with Client(target, max_images_per_request=1) as client:
        split = client.predict([pixels] * 3, model=MODEL, version_label="canary")
        assert [p.model_version for p in split] == [2, 2, 2]
        keyed = client.predict([pixels] * 3, model=MODEL, route_key="k0")
        assert [p.model_version for p in keyed] == [sides["k0"]] * 3

    async def aio() -> list[int]:
        async with AsyncClient(target) as client:
            canary = await client.predict(pixels, model=MODEL, version_label="canary")
            keyed = [await client.predict(pixels, model=MODEL, route_key=key) for key in sides]
            return [canary[0].model_version, *(p[0].model_version for p in keyed)]

    assert asyncio.run(aio()) == [2, *sides.values()]
