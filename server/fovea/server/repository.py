"""The model repository: polls the base folder, loads and warms versions, swaps them in atomically.

A new version is loaded and warmed beside the one serving, then published by replacing the model's
version map in one assignment. Requests hold a lease on the version they resolved; a retired version
is released only when its last lease is returned, so no request is dropped by a reload.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import posixpath
import time
from collections.abc import Callable

from fovea.server import runner as tf_runner
from fovea.server.batcher import Batcher, warmup_sizes
from fovea.server.config import Settings
from fovea.server.errors import InvalidArgument, NotFound, Unavailable
from fovea.server.metrics import Metrics

log = logging.getLogger(__name__)


class ServedVersion:
    """A loaded, warm version with its batcher; `leases` counts requests that resolved it."""

    def __init__(self, runner: tf_runner.ModelRunner, batcher: Batcher) -> None:
        self.runner = runner
        self.info = runner.info
        self.batcher = batcher
        self.leases = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> int:
        return self.info.version

    def acquire(self) -> ServedVersion:
        self.leases += 1
        self._idle.clear()
        return self

    def release(self) -> None:
        self.leases -= 1
        if self.leases == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class ModelRepository:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        on_ready_change: Callable[[bool], None] | None = None,
        runner_factory: Callable[[str, str, int], tf_runner.ModelRunner] = tf_runner.ModelRunner,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._on_ready_change = on_ready_change
        self._runner_factory = runner_factory
        self._models: dict[str, dict[int, ServedVersion]] = {}
        self._known: list[str] = []
        self._failures: dict[tuple[str, int], int] = {}
        self._retiring: set[asyncio.Task] = set()
        self._ready = False
        self._task: asyncio.Task | None = None
        # TF loads run on their own thread so a slow load never competes with the serving threads'
        # event loop; one at a time keeps memory peaks to one extra model.
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fovea-loader")

    # -- lookups (called on the event loop; never await between resolve and acquire) -------------

    @property
    def ready(self) -> bool:
        return self._ready

    def acquire(self, name: str, version: int) -> ServedVersion:
        """Resolve a model spec and lease that version; the caller must call `release()`."""
        versions = self._versions_of(name)
        if version == 0:
            return versions[max(versions)].acquire()
        if version < 0:
            raise InvalidArgument(
                f"model_spec.version must be 0 (latest) or a positive integer, not {version}"
            )
        if version not in versions:
            raise NotFound(
                f"version {version} of model {self._name_or_only(name)!r} is not loaded; loaded versions: "
                f"{sorted(versions)}"
            )
        return versions[version].acquire()

    def served(self, name: str, version: int) -> tuple[ServedVersion, list[int]]:
        """The version a spec names (not leased) and every loaded version of its model."""
        versions = self._versions_of(name)
        if version == 0:
            return versions[max(versions)], sorted(versions)
        if version not in versions:
            raise NotFound(
                f"version {version} of model {self._name_or_only(name)!r} is not loaded; loaded versions: "
                f"{sorted(versions)}"
            )
        return versions[version], sorted(versions)

    def status(self) -> list[tuple[str, list[int], bool]]:
        names = sorted(set(self._known) | set(self._models))
        return [(n, sorted(self._models.get(n, {})), bool(self._models.get(n))) for n in names]

    def _name_or_only(self, name: str) -> str:
        if name:
            return name
        names = sorted(set(self._known) | set(self._models))
        return names[0] if len(names) == 1 else ""

    def _versions_of(self, name: str) -> dict[int, ServedVersion]:
        if not name:
            names = sorted(set(self._known) | set(self._models))
            if not names:
                raise Unavailable("no model is loaded yet; retry later")
            if len(names) > 1:
                raise InvalidArgument(
                    f"this server serves {len(names)} models ({', '.join(names)}); set model_spec.name"
                )
            name = names[0]
        versions = self._models.get(name)
        if versions:
            return versions
        if name in self._known:
            raise Unavailable(f"model {name!r} has no version loaded yet; retry later")
        served = sorted(set(self._known) | set(self._models))
        raise NotFound(f"model {name!r} is not served; served models: {', '.join(served) or '(none)'}")

    # -- polling ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll_forever(), name="fovea-repository")

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scanning %s failed; will retry", self._settings.model_dir)
            await asyncio.sleep(self._settings.poll_interval)

    async def poll_once(self) -> None:
        base = self._settings.model_dir
        loop = asyncio.get_running_loop()
        names = await loop.run_in_executor(None, tf_runner.list_model_names, base)
        listed: dict[str, list[int]] = {}
        for name in names:
            listed[name] = await loop.run_in_executor(
                None, tf_runner.list_versions, posixpath.join(base, name)
            )
        self._known = [n for n, v in listed.items() if v]
        if not self._known:
            log.warning(await loop.run_in_executor(None, _nothing_found, base, names))
        for name, versions in listed.items():
            wanted = self._wanted(versions)
            await self._sync_model(name, wanted)
            pending = [v for v in wanted if v not in self._models.get(name, {})]
            self._metrics.versions_pending.labels(name).set(len(pending))
        for name in [n for n in self._models if n not in listed]:
            log.info("model %s disappeared from %s; unloading it", name, base)
            await self._sync_model(name, [])
        self._metrics.last_scan.set(time.time())
        self._update_ready()

    def _wanted(self, versions: list[int]) -> list[int]:
        if not versions:
            return []
        specific = self._settings.specific_versions()
        if specific is not None:
            return [v for v in versions if v in specific]
        if self._settings.version_policy == "all":
            return versions
        return [versions[-1]]

    async def _sync_model(self, name: str, wanted: list[int]) -> None:
        current = dict(self._models.get(name, {}))
        for version in wanted:
            if version in current:
                continue
            served = await self._load(name, version)
            if served is not None:
                current[version] = served
                # Publish each version as soon as it is warm: one assignment, seen atomically.
                # Readiness is updated after the whole scan, so a first start with several versions
                # or models turns SERVING once all of them are warm, as TF Serving does.
                self._models[name] = dict(current)
        loaded_wanted = [v for v in wanted if v in current]
        if loaded_wanted or not wanted:
            # Retire what the policy no longer wants, but only once something wanted serves
            # (a failed load keeps the old version serving).
            for version in [v for v in current if v not in wanted]:
                old = current.pop(version)
                self._models[name] = dict(current)
                task = asyncio.get_running_loop().create_task(self._retire(old))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
        if not current:
            self._models.pop(name, None)

    async def _load(self, name: str, version: int) -> ServedVersion | None:
        path = posixpath.join(self._settings.model_dir, name, str(version))
        loop = asyncio.get_running_loop()
        s = self._settings
        sizes = warmup_sizes(s.max_batch_size, s.allowed_batch_sizes)
        try:
            start = time.monotonic()
            runner = await loop.run_in_executor(self._loader, self._runner_factory, path, name, version)
            loaded = time.monotonic()
            self._metrics.load_duration.labels(name).observe(loaded - start)
            if s.warmup:
                await loop.run_in_executor(self._loader, runner.warm_up, sizes)
                self._metrics.warmup_duration.labels(name).observe(time.monotonic() - loaded)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures = self._failures.get((name, version), 0) + 1
            self._failures[(name, version)] = failures
            self._metrics.model_load_failures.labels(name).inc()
            log.error(
                "loading %s version %d from %s failed (attempt %d; retrying every %gs): %s",
                name,
                version,
                path,
                failures,
                s.poll_interval,
                exc,
                exc_info=failures == 1,
            )
            return None
        self._failures.pop((name, version), None)
        batcher = Batcher(
            runner.predict,
            max_batch_size=s.max_batch_size,
            batch_timeout_s=s.batch_timeout_ms / 1000.0,
            allowed_batch_sizes=s.allowed_batch_sizes,
            max_in_flight=s.max_in_flight_batches,
            max_queue_size=s.max_queue_size,
            stats=self._metrics.batcher_stats(name, version),
            name=f"fovea-{name}-{version}",
        )
        batcher.start()
        self._metrics.model_loads.labels(name).inc()
        self._metrics.version_info.labels(name, str(version)).set(1)
        log.info(
            "loaded %s version %d (%dx%d, %d classes) in %.2fs%s",
            name,
            version,
            runner.info.height,
            runner.info.width,
            len(runner.info.labels),
            time.monotonic() - start,
            f", warmed batch sizes {sizes}" if s.warmup else ", warm-up off",
        )
        return ServedVersion(runner, batcher)

    async def _retire(self, old: ServedVersion) -> None:
        await old.wait_idle()
        await old.batcher.close(drain=True)
        old.runner.release()
        self._metrics.version_info.remove(old.name, str(old.version))
        with contextlib.suppress(KeyError):
            self._metrics.queue_depth.remove(old.name, str(old.version))
        log.info("released %s version %d", old.name, old.version)

    def _update_ready(self) -> None:
        ready = any(self._models.values())
        if ready != self._ready:
            self._ready = ready
            if self._on_ready_change is not None:
                self._on_ready_change(ready)

    async def close(self) -> None:
        """Stop polling and release every version (call after requests have drained)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for versions in self._models.values():
            for served in versions.values():
                await served.batcher.close(drain=True)
                served.runner.release()
        self._models.clear()
        self._loader.shutdown(wait=False)


def _nothing_found(base: str, names: list[str]) -> str:
    """Why a scan of --model-dir found no version, and the layout it expects (one log line)."""
    layout = f"expected {posixpath.join(base, '<model name>', '<version>', 'saved_model.pb')}"
    parent = posixpath.dirname(base.rstrip("/"))
    if names and all(n.isdigit() for n in names) and tf_runner.list_versions(base):
        return f"--model-dir {base} is one model's folder (versions {', '.join(names)}): use its parent, {parent}"
    if posixpath.basename(base.rstrip("/")).isdigit() and tf_runner.list_versions(parent):
        return f"--model-dir {base} is a version folder: use the folder above its model, {posixpath.dirname(parent)}"
    if "://" not in base and not os.path.isdir(base):
        return f"--model-dir {base} does not exist; waiting for it ({layout})"
    if not names:
        return f"--model-dir {base} is empty; waiting for a model ({layout})"
    return f"--model-dir {base} has no complete version in {', '.join(names)}; waiting ({layout})"
