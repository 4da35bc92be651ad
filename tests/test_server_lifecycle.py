"""Readiness, hot reload under traffic, failed loads and version policies, against a real server."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the server tests need the server extra")

from _models import export_tiny  # noqa: E402
from _serving import channel, client, sample, start_server, stop_server, wait_until  # noqa: E402
from fovea.client import FoveaError  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

SIZE = 24
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def signature_probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    loaded = tf.saved_model.load(str(path))
    return loaded.signatures["serving_default"](images=tf.constant(images))["probabilities"].numpy()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def server(models_dir):
    srv = start_server(models_dir, max_batch_size=4, poll_interval=0.2)
    yield srv
    stop_server(srv)


def test_not_serving_until_a_model_is_loaded_and_warm(server, models_dir) -> None:
    zeros = np.zeros((SIZE, SIZE, 3), np.uint8)
    with channel(server.port) as ch, client(server.port, max_images_per_request=8) as fovea:
        for service in ("", "fovea.v1.ClassifierService"):
            assert fovea.health(service) == "NOT_SERVING"
        with pytest.raises(FoveaError) as info:
            fovea.predict(zeros)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert fovea.list_models() == []

        seen: list[tuple[int, float]] = []  # (status, warm-ups completed when the status arrived)
        health = health_pb2_grpc.HealthStub(ch)  # raw stub: the client has no Watch
        watch = health.Watch(health_pb2.HealthCheckRequest(service="fovea.v1.ClassifierService"), timeout=120)

        def follow() -> None:
            for update in watch:
                warm = sample(server, "fovea_model_warmup_duration_seconds_count", model="tiny")
                seen.append((update.status, warm))
                if update.status == SERVING:
                    return

        follower = threading.Thread(target=follow)
        follower.start()
        wait_until(lambda: seen, what="the first health update")
        export_tiny(models_dir, "tiny", SIZE, seed=1)
        follower.join(60)
        watch.cancel()
        assert [s for s, _ in seen] == [NOT_SERVING, SERVING]
        assert seen[-1][1] == 1, "SERVING was reported before the warm-up finished"
        # Ready means warm: the first request after SERVING succeeds at once.
        assert fovea.predict(zeros, timeout=10)[0].model_version == 1


def test_hot_reload_under_traffic_drops_nothing(server, models_dir) -> None:
    images = np.random.default_rng(5).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    stop = threading.Event()
    errors: list[str] = []
    versions: list[list[int]] = [[] for _ in range(4)]
    last: dict[int, np.ndarray] = {}

    def traffic(k: int) -> None:
        # No client retries: a request the reload dropped shows up here as an error.
        with client(server.port, max_images_per_request=8) as fovea:
            while not stop.is_set():
                try:
                    predictions = fovea.predict(images, return_probabilities=True, timeout=30)
                except FoveaError as exc:
                    errors.append(str(exc))
                    continue
                version = predictions[0].model_version
                assert predictions[1].model_version == version
                versions[k].append(version)
                last[version] = np.array([p.probabilities for p in predictions])

    threads = [threading.Thread(target=traffic, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(len(v) > 5 for v in versions), what="traffic on version 1")
        v2 = export_tiny(models_dir, "tiny", SIZE, seed=2)
        wait_until(lambda: all(v and v[-1] == 2 for v in versions), what="responses from version 2")
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == [], errors[:5]
    for seq in versions:
        # Each caller saw version 1, then only version 2: the swap is atomic.
        switch = seq.index(2)
        assert set(seq[:switch]) == {1} and set(seq[switch:]) == {2}
    np.testing.assert_allclose(last[2], signature_probabilities(v2, images), atol=1e-5)
    # The old version is released once its in-flight batches finished.
    wait_until(
        lambda: sample(server, "fovea_model_version_info", model="tiny", version="1") == 0, what="v1 released"
    )
    assert sample(server, "fovea_model_version_info", model="tiny", version="2") == 1
    with client(server.port) as fovea:
        assert [(m.name, list(m.versions)) for m in fovea.list_models()] == [("tiny", [2])]


def test_failed_load_is_counted_and_retried_while_the_old_version_serves(server, models_dir) -> None:
    broken = models_dir / "tiny" / "3"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a saved model")
    try:
        wait_until(
            lambda: sample(server, "fovea_model_load_failures_total", model="tiny") >= 2,
            what="two failed load attempts",
        )
        with client(server.port) as fovea:
            assert fovea.predict(np.zeros((SIZE, SIZE, 3), np.uint8))[0].model_version == 2
            assert fovea.health() == "SERVING"
    finally:
        shutil.rmtree(broken)


def test_version_policy_all_and_specific(tmp_path) -> None:
    v1 = export_tiny(tmp_path, "m", 16, seed=1)
    v2 = export_tiny(tmp_path, "m", 16, seed=2)
    image = np.random.default_rng(9).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    for policy, expected in (("all", [1, 2]), ("1", [1])):
        srv = start_server(tmp_path, version_policy=policy, max_batch_size=2)
        try:
            wait_until(lambda srv=srv: srv.manager.ready, what="ready")
            with client(srv.port) as fovea:
                meta = fovea.metadata()
                assert list(meta.loaded_versions) == expected and meta.version == expected[-1]
                for version, path in ((1, v1), (2, v2)):
                    if version not in expected:
                        with pytest.raises(FoveaError) as info:
                            fovea.predict(image, version=version)
                        assert info.value.code == grpc.StatusCode.NOT_FOUND
                        continue
                    (got,) = fovea.predict(image, version=version, return_probabilities=True)
                    assert got.model_version == version
                    expected_p = signature_probabilities(path, image)[0]
                    np.testing.assert_allclose(got.probabilities, expected_p, atol=1e-5)
        finally:
            stop_server(srv)


def test_half_written_versions_are_never_listed(tmp_path) -> None:
    from fovea.server.loader import GFileStorage
    from fovea.server.source import ModelSource

    for name, complete in (
        ("1", True),
        ("2", False),
        (".tmp-abc", True),
        ("0", True),
        ("x3", True),
        ("10", True),
    ):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "saved_model.pb").write_bytes(b"")
    assert ModelSource(str(tmp_path.parent), GFileStorage()).versions(tmp_path.name) == [1, 10]
    (tmp_path.parent / f"{tmp_path.name}-base").mkdir()
    base = tmp_path.parent / f"{tmp_path.name}-base"
    for name in ("b", "a", ".hidden"):
        (base / name).mkdir()
    (base / "file.txt").write_text("")
    assert ModelSource(str(base), GFileStorage()).model_names() == ["a", "b"]
    # --model-name: the base folder is one model's root (KServe's /mnt/models).
    single = ModelSource(str(tmp_path), GFileStorage(), "isvc")
    assert (single.model_names(), single.versions("isvc"), single.root("isvc")) == (
        ["isvc"],
        [1, 10],
        str(tmp_path),
    )


def test_every_model_under_the_base_folder_is_served(tmp_path) -> None:
    export_tiny(tmp_path, "cats", 16, labels=("tabby", "siamese"), seed=1)
    export_tiny(tmp_path, "shapes", 24, seed=2)
    srv = start_server(tmp_path, max_batch_size=2)
    try:
        with client(srv.port, max_images_per_request=8) as fovea:
            wait_until(lambda: fovea.health() == "SERVING", what="SERVING")
            status = [(m.name, list(m.versions), m.ready) for m in fovea.list_models()]
            assert status == [("cats", [1], True), ("shapes", [1], True)]
            image = np.zeros((20, 20, 3), np.uint8)
            (cat,) = fovea.predict(image, model="cats", top_k=2)
            (shape,) = fovea.predict(image, model="shapes")
            assert {c.label for c in cat.top} == {"tabby", "siamese"} and cat.model_name == "cats"
            assert shape.model_name == "shapes" and len(shape.top) == 3
            assert fovea.metadata(model="shapes").input_height == 24
            with pytest.raises(FoveaError) as info:
                fovea.predict(image)  # two models: the name is required
            assert (
                info.value.code == grpc.StatusCode.INVALID_ARGUMENT
                and "model_spec.name" in info.value.details
            )
    finally:
        stop_server(srv)
