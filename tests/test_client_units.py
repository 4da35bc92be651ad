"""Pure parts of fovea.client: request splitting, backoff, timeouts, the health messages."""

from __future__ import annotations

import random

import grpc
import pytest
from fovea.client import FoveaError, RetryPolicy, _health, _split
from fovea.client._retry import resolve_timeout
from fovea.v1 import classifier_pb2


@pytest.mark.parametrize("seed", range(5))
def test_split_requests_fit_the_limit_and_keep_order(seed: int) -> None:
    rng = random.Random(seed)
    images = [
        classifier_pb2.Image(encoded=b"\xff\xd8\xff" + bytes(rng.randrange(0, 3000))) for _ in range(60)
    ]
    base = classifier_pb2.PredictRequest(model_spec=classifier_pb2.ModelSpec(name="m", version=3), top_k=2)
    limit, max_images = 10_000, 7
    ranges = _split.split(
        [im.ByteSize() for im in images],
        [str(i) for i in range(len(images))],
        base_size=base.ByteSize(),
        max_message_bytes=limit,
        max_images=max_images,
    )
    assert [i for r in ranges for i in r] == list(range(len(images)))
    for span in ranges:
        request = classifier_pb2.PredictRequest()
        request.CopyFrom(base)
        request.images.extend(images[i] for i in span)
        assert 1 <= len(span) <= max_images
        assert request.ByteSize() <= _split.budget(limit)


def test_split_rejects_an_image_that_cannot_fit() -> None:
    with pytest.raises(FoveaError) as info:
        _split.split(
            [10, 50_000], ["small.png", "huge.png"], base_size=10, max_message_bytes=20_000, max_images=8
        )
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith("huge.png:")


def test_full_jitter_backoff_stays_under_its_growing_cap() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    rng = random.Random(0)
    for retry, cap in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        waits = [policy.backoff(retry, rng) for _ in range(200)]
        assert all(0.0 <= w <= cap for w in waits)
        assert max(waits) > cap * 0.8  # jitter spans the range, not a fixed delay


def test_timeout_none_means_the_default_never_forever() -> None:
    assert resolve_timeout(None, 30.0) == 30.0
    assert resolve_timeout(2, 30.0) == 2.0
    for bad in (0, -3, float("inf"), True, "5"):
        with pytest.raises(FoveaError):
            resolve_timeout(bad, 30.0)


def test_health_messages_match_the_grpc_health_wire_format() -> None:
    from grpc_health.v1 import health_pb2

    ours = _health.HealthCheckRequest(service="fovea.v1.ClassifierService").SerializeToString()
    assert health_pb2.HealthCheckRequest.FromString(ours).service == "fovea.v1.ClassifierService"
    for status, name in [(1, "SERVING"), (2, "NOT_SERVING"), (3, "SERVICE_UNKNOWN"), (0, "UNKNOWN")]:
        wire = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        assert _health.status_name(_health.HealthCheckResponse.FromString(wire)) == name


def test_result_to_dict_gives_json_lists_and_drops_absent_probabilities() -> None:
    from fovea.client._results import Classification, ModelMetadata, Prediction

    top = (Classification(1, "cat", 0.5),)
    assert Prediction(top, None, "m", 3, "x.jpg").to_dict() == {
        "top": [{"index": 1, "label": "cat", "score": 0.5}],
        "model_name": "m",
        "model_version": 3,
        "source": "x.jpg",
        "abstained": False,
    }
    assert Prediction(top, (0.5, 0.5), "m", 3, "x.jpg").to_dict()["probabilities"] == [0.5, 0.5]
    meta = ModelMetadata("m", 2, ("a", "b"), 224, 224, "resnet50", (1, 2), {"acc": 0.9})
    assert meta.to_dict()["labels"] == ["a", "b"] and meta.to_dict()["loaded_versions"] == [1, 2]
