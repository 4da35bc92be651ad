"""Storage and model faults: a failed listing changes nothing, a broken newest version falls back to
the newest that loads (with backoff), a version reloaded while its old copy retires keeps its metrics,
and an out-of-memory error is RESOURCE_EXHAUSTED. The manager runs with a fake storage and fake models
(no TensorFlow) unless a test says otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import numpy as np
import pytest
from fovea.contract import ModelMetadata
from fovea.server.config import Settings
from fovea.server.errors import ResourceExhausted
from fovea.server.manager import ModelManager
from fovea.server.metrics import Metrics
from fovea.server.source import ModelSource


class FakeStorage:
    """<base>/<name>/<version>/saved_model.pb as a dict; `fail` makes every call raise like EIO, or
    raise the exception it is set to."""

    def __init__(self, models: dict[str, list[int]]) -> None:
        self.models = models
        self.fail: bool | BaseException = False

    def _check(self) -> None:
        if isinstance(self.fail, BaseException):
            raise self.fail
        if self.fail:
            raise OSError(5, "Input/output error")

    def listdir(self, path: str) -> list[str]:
        self._check()
        parts = path.strip("/").split("/")
        if len(parts) == 1:
            return list(self.models)
        return [str(v) for v in self.models.get(parts[1], [])]

    def isdir(self, path: str) -> bool:
        self._check()
        return True

    def exists(self, path: str) -> bool:
        self._check()
        return True

    def read(self, path: str) -> bytes | None:
        self._check()
        return None  # no rollout file


class FakeModel:
    def __init__(self, name: str, version: int) -> None:
        self.metadata = ModelMetadata(
            name=name, version=version, labels=["a", "b"], input_height=2, input_width=2
        )

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.tile(np.array([[0.25, 0.75]], np.float32), (len(images), 1))

    def decode(self, data: bytes) -> np.ndarray:
        return np.zeros((2, 2, 3), np.uint8)

    def resize(self, image: np.ndarray) -> np.ndarray:
        return np.zeros((2, 2, 3), np.uint8)

    def warm_up(self, batch_sizes, pace) -> None: ...

    def release(self) -> None: ...


def manager(
    storage: FakeStorage, broken: set[int] = frozenset(), **settings
) -> tuple[ModelManager, Metrics, list]:
    metrics = Metrics()
    loads: list[tuple[str, int]] = []

    def load(path: str, name: str, version: int) -> FakeModel:
        loads.append((name, version))
        if version in broken:
            raise ValueError(f"version {version} is not a SavedModel")
        return FakeModel(name, version)

    s = Settings(**{"model_dir": "base", "poll_interval": 0.01, **settings})
    return ModelManager(s, metrics, ModelSource("base", storage), load), metrics, loads


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_failed_listing_changes_nothing() -> None:
    storage = FakeStorage({"m": [1]})
    mgr, metrics, _ = manager(storage)
    await mgr.poll_once()
    assert mgr.ready and mgr.loaded_versions("m") == [1]
    storage.fail = True
    with pytest.raises(OSError):
        await mgr.poll_once()
    # Before: the error read as an empty listing and retired every version.
    assert mgr.ready and mgr.loaded_versions("m") == [1]
    assert mgr.lookup("m", 0).version == 1
    mgr.start()  # the polling loop counts the failure and keeps going
    for _ in range(200):
        if value(metrics, "fovea_model_dir_scan_failures_total") >= 2:
            break
        await asyncio.sleep(0.01)
    assert value(metrics, "fovea_model_dir_scan_failures_total") >= 2
    assert mgr.loaded_versions("m") == [1]
    await mgr.close()


def _lines(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fovea.server.manager" and r.levelno == level]


@pytest.mark.parametrize(
    "fault, reason",
    [
        (OSError(116, "Stale file handle"), "io_error"),
        (PermissionError(13, "Permission denied"), "permission_denied"),
        ("model folder gone", "model_dir_empty"),
        ("model folder empty", "no_complete_version"),
    ],
)
async def test_a_storage_outage_retires_nothing_however_long(fault, reason, caplog) -> None:
    storage = FakeStorage({"m": [1, 2]})
    mgr, metrics, loads = manager(storage, retire_after_scans=2)
    await mgr.poll_once()
    assert mgr.loaded_versions("m") == [2]
    if isinstance(fault, BaseException):
        storage.fail = fault
    elif fault == "model folder gone":
        storage.models = {}  # the only model's folder renamed away: --model-dir lists nothing
    else:
        storage.models["m"] = []
    with caplog.at_level(logging.INFO, logger="fovea.server.manager"):
        for _ in range(20):  # ten times the scans, and the grace (2 x 10 ms), that retire a removal
            with contextlib.suppress(OSError):
                await mgr.poll_once()
            await asyncio.sleep(0.005)
        # Before: the empty listings retired version 2 at the first scan (NOT_SERVING on every replica).
        assert mgr.ready and mgr.loaded_versions("m") == [2] and mgr.lookup("", 0).version == 2
        assert value(metrics, "fovea_model_dir_problems_total", reason=reason) == 20
        assert value(metrics, "fovea_model_dir_unreachable") == 1
        errors = _lines(caplog, logging.ERROR)
        assert len(errors) == 1, errors  # said once, not at every scan
        assert (
            "model storage unreachable" in errors[0]
            and "keeping 1 loaded version(s) serving (m:2)" in errors[0]
        )
        storage.fail, storage.models = False, {"m": [1, 2]}
        await mgr.poll_once()
        await mgr.poll_once()
    assert value(metrics, "fovea_model_dir_unreachable") == 0
    back = [m for m in _lines(caplog, logging.WARNING) if "readable again" in m]
    assert len(back) == 1 and "20 scan(s)" in back[0], back
    assert mgr.loaded_versions("m") == [2] and loads == [("m", 2)]  # never reloaded
    await mgr.close()


async def test_a_removal_a_readable_listing_shows_retires_only_once_confirmed(caplog) -> None:
    storage = FakeStorage({"m": [1, 2], "n": [1]})
    mgr, metrics, loads = manager(storage, version_policy="all", retire_after_scans=3, poll_interval=0.05)
    await mgr.poll_once()
    assert mgr.loaded_versions("m") == [1, 2]
    # A version folder renamed away and back within the grace: served throughout, never reloaded.
    storage.models["m"] = [1]
    for _ in range(2):
        await mgr.poll_once()
    assert mgr.loaded_versions("m") == [1, 2]
    assert value(metrics, "fovea_model_versions_missing", model="m") == 1
    storage.models["m"] = [1, 2]
    await mgr.poll_once()
    assert value(metrics, "fovea_model_versions_missing", model="m") == 0
    # Removed for real: kept for three scans AND 3 x 50 ms since a scan last saw it, then retired.
    storage.models["m"] = [1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fovea.server.manager"):
        for _ in range(5):  # five quick scans: more than three, but within the grace
            await mgr.poll_once()
        assert mgr.loaded_versions("m") == [1, 2]
        await asyncio.sleep(0.2)
        await mgr.poll_once()
        assert mgr.loaded_versions("m") == [1]
        # A whole model folder removed while the listing still shows another model: the same.
        del storage.models["m"]
        await mgr.poll_once()
        assert mgr.loaded_versions("m") == [1]
        await asyncio.sleep(0.2)
        for _ in range(3):
            await mgr.poll_once()
        assert mgr.loaded_versions("m") == [] and mgr.loaded_versions("n") == [1]
    warnings = _lines(caplog, logging.WARNING)
    assert sum("is missing from" in m for m in warnings) == 2, warnings  # once per version, not per scan
    assert sum(m.endswith(": retiring it") for m in warnings) == 2, warnings
    assert value(metrics, "fovea_model_dir_unreachable") == 0
    assert sorted(loads) == [("m", 1), ("m", 2), ("n", 1)]
    await mgr.close()


async def test_a_broken_newest_version_falls_back_on_a_fresh_start(caplog) -> None:
    storage = FakeStorage({"m": [1, 2, 3]})
    # The backoff starts at one poll interval: 30 s, so a loaded machine's slow polls never outlast it.
    mgr, metrics, loads = manager(storage, broken={3}, poll_interval=30.0)
    with caplog.at_level(logging.ERROR, logger="fovea.server.manager"):
        await mgr.poll_once()
    # Before: a fresh start with a broken newest version served nothing.
    assert mgr.ready and mgr.loaded_versions("m") == [2]
    assert value(metrics, "fovea_model_version_broken", model="m", version="3") == 1
    assert "version 3" in caplog.text and "retrying in" in caplog.text
    # Backoff: the next polls do not reload the broken version at once.
    for _ in range(5):
        await mgr.poll_once()
    assert loads.count(("m", 3)) == 1 and loads.count(("m", 2)) == 1
    # Fixed later (republished): it is retried after its backoff and replaces the fallback.
    mgr._load_model = lambda path, name, version: FakeModel(name, version)
    mgr._retry_at[("m", 3)] = 0.0
    await mgr.poll_once()
    assert mgr.loaded_versions("m") == [3]
    assert value(metrics, "fovea_model_version_broken", model="m", version="3") == 0
    await mgr.close()


async def test_a_version_reloaded_while_its_old_copy_retires_keeps_its_metrics() -> None:
    storage = FakeStorage({"m": [1], "other": [1]})
    mgr, metrics, loads = manager(storage, version_policy="all", retire_after_scans=1)
    await mgr.poll_once()
    old = mgr.lookup("m", 1).acquire()  # a request still holds the old copy
    storage.models["m"] = []
    await asyncio.sleep(0.02)  # past the grace (one poll interval) since a scan last saw it
    await mgr.poll_once()  # retired: waits for the request
    storage.models["m"] = [1]
    await mgr.poll_once()  # published again and loaded while the old copy still drains
    assert [load for load in loads if load[0] == "m"] == [("m", 1), ("m", 1)]
    assert mgr.lookup("m", 1) is not old
    old.release()
    await asyncio.gather(*mgr._retiring)
    # Before: the old copy's release removed the new copy's series (or raised KeyError in its task).
    assert value(metrics, "fovea_model_version_info", model="m", version="1") == 1
    await mgr.close()


def test_out_of_memory_in_the_model_is_resource_exhausted(tmp_path) -> None:
    tf = pytest.importorskip("tensorflow", reason="the loader test needs the server extra")
    from _models import export_tiny
    from fovea.server import loader

    model = loader.load(str(export_tiny(tmp_path, "tiny", 16)), "tiny", 1)

    def oom(*_, **__):
        raise tf.errors.ResourceExhaustedError(
            None, None, "OOM when allocating tensor with shape[64,2048,7,7]"
        )

    model._plain = oom  # what predict calls for the plain signature
    with pytest.raises(ResourceExhausted, match="out of memory"):
        model.predict(np.zeros((4, 16, 16, 3), np.uint8))


def test_storage_errors_are_not_empty_listings() -> None:
    pytest.importorskip("tensorflow", reason="the loader test needs the server extra")
    from fovea.server import loader

    storage = loader.GFileStorage()
    # An error other than "not found" (here: a file system TF cannot reach) must raise, so the scan
    # fails and nothing changes; tf.io.gfile.isdir alone answers False, which read as "no models".
    with pytest.raises(OSError, match="not implemented"):
        storage.isdir("nosuchfs://models/m")
    assert storage.listdir("/nonexistent-fovea-folder") == []  # really absent: empty


def test_liveness_does_not_depend_on_a_loaded_model(tmp_path) -> None:
    pytest.importorskip("tensorflow", reason="the server test needs the server extra")
    from _serving import client, start_server, stop_server
    from deploy_support import K8S, load_documents
    from fovea.server.app import LIVENESS_SERVICE

    srv = start_server(tmp_path)  # an empty model folder: nothing to load
    try:
        with client(srv.port) as c:
            assert c.health() == "NOT_SERVING"  # readiness: no model
            assert c.health(LIVENESS_SERVICE) == "SERVING"  # alive all the same
    finally:
        stop_server(srv)
    (deployment,) = [
        d
        for d in load_documents((K8S / "40-server-deployment.yaml").read_text())
        if d["kind"] == "Deployment"
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["grpc"].get("service") == LIVENESS_SERVICE
    assert container["readinessProbe"]["grpc"].get("service", "") != LIVENESS_SERVICE
