"""The manager (TF Serving's word): aspired versions, loading, the atomic swap, and retirement.

Each poll asks the source what is on storage, picks the versions the policy wants (latest, all, or
specific), loads and warms the missing ones beside those serving, and publishes each by replacing the
model's version map in one assignment. A version the policy no longer wants is retired: removed from
the map at once, released when its last lease is returned, so no request is dropped by a reload.
`lookup` is the one place a (name, version) spec is resolved.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import posixpath
import time
from collections.abc import Callable

from fovea.server.background import ServingFirst, handing_gil_often, lower_thread_priority
from fovea.server.batcher import warmup_sizes
from fovea.server.config import Settings
from fovea.server.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, clip
from fovea.server.metrics import Metrics
from fovea.server.rollout import Rollouts
from fovea.server.servable import Model, ServedVersion
from fovea.server.source import ModelSource, failure_reason

log = logging.getLogger(__name__)

MAX_RETRY_BACKOFF_S = 600.0  # a broken version is retried at least every 10 minutes
OUTAGE_LOG_EVERY_S = 300.0  # a storage outage is logged when it starts, then at most this often


@dataclasses.dataclass
class _Outage:
    """Scans in a row that could not retire anything (failed, or found no version at all)."""

    since: float
    reason: str
    logged_at: float
    scans: int = 1


@dataclasses.dataclass
class _Missing:
    """A loaded version readable listings have missed: since when (the last scan that saw it)."""

    last_seen: float
    scans: int = 0


# While nothing is found, why is logged once, then again only when it changes or after this long: a
# pod waiting for its volume must not fill its log with the same line every --poll-interval.
NOTHING_FOUND_REMINDER_S = 600.0


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        source: ModelSource,
        load: Callable[[str, str, int], Model],
        on_ready_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._source = source
        self._load_model = load
        self._on_ready_change = on_ready_change
        self._models: dict[str, dict[int, ServedVersion]] = {}
        self._known: list[str] = []
        self._failures: dict[tuple[str, int], int] = {}
        self._retry_at: dict[tuple[str, int], float] = {}  # time.monotonic() of a broken version's retry
        self._retiring: set[asyncio.Task] = set()
        self._outage: _Outage | None = None
        self._missing: dict[tuple[str, int], _Missing] = {}
        self._last_seen_at = time.monotonic()  # when a scan last listed storage (loaded versions included)
        self._scan_error: BaseException | None = None
        self._ready = False
        self._task: asyncio.Task | None = None
        self._nothing_said: tuple[str, float] | None = None  # the last "nothing found" line, and when
        self.rollouts = Rollouts(metrics.rollout_file_errors)
        # TF loads run on their own thread so a slow load never competes with the serving threads'
        # event loop; one at a time keeps memory peaks to one extra model. At the lowest CPU
        # priority: during a hot reload the version serving keeps the cores.
        self._loader = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="fovea-loader", initializer=lower_thread_priority
        )
        # Decoding and resizing, shared by every version.
        threads = settings.decode_threads()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="fovea-preprocess")

    # -- lookups (called on the event loop; never await between lookup and acquire) ---------------

    @property
    def ready(self) -> bool:
        return self._ready

    def lookup(self, name: str, version: int, label: str = "", route: str | None = None) -> ServedVersion:
        """The version a model spec names: `name` "" for the only model, `version` 0 for the latest.

        `label` names a version through the model's rollout file. With neither version nor label, a
        model whose rollout file has traffic shares is routed by them (`route`: see Rollouts.route).
        """
        if version < 0:
            raise InvalidArgument(
                f"model_spec.version must be 0 (latest) or a positive integer, not {version}"
            )
        if version and label:
            raise InvalidArgument("set model_spec.version or model_spec.version_label, not both")
        versions = self._versions_of(name)
        model = self._name_or_only(name)
        if not version and not label:
            label = self.rollouts.route(model, route, set(versions))
            if not label:
                return versions[max(versions)]
        if label:
            return self._by_label(model, versions, label)
        if version not in versions:
            raise NotFound(
                f"version {version} of model {clip(model)} is not loaded; loaded versions: {sorted(versions)}"
            )
        return versions[version]

    def _by_label(self, model: str, versions: dict[int, ServedVersion], label: str) -> ServedVersion:
        rollout = self.rollouts.get(model)
        labels = rollout.labels if rollout else {}
        if label not in labels:
            known = ", ".join(sorted(labels)) or "(none: the model has no rollout.json)"
            raise NotFound(f"model {clip(model)} has no version label {clip(label)}; its labels: {known}")
        version = labels[label]
        if version not in versions:
            # Never a silent fallback to another version: the caller asked for this one.
            raise FailedPrecondition(
                f"label {clip(label)} of model {clip(model)} names version {version}, which is not loaded "
                f"(loaded versions: {sorted(versions)}); fix rollout.json or wait for the version to load"
            )
        return versions[version]

    def labels(self, name: str) -> dict[str, int]:
        """The model's version labels from its last good rollout file."""
        rollout = self.rollouts.get(name)
        return dict(rollout.labels) if rollout else {}

    def loaded_versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def serving_busy(self) -> bool:
        """Whether a loaded version has work queued, being decoded or computing.

        Called from the loader's threads: it only reads, and list() copies each map in one step.
        """
        return any(v.busy() for versions in list(self._models.values()) for v in list(versions.values()))

    def loaded(self) -> list[ServedVersion]:
        """Every serving version, by name then version."""
        return [self._models[n][v] for n in sorted(self._models) for v in sorted(self._models[n])]

    def knows(self, name: str) -> bool:
        """Whether `name` is a model on storage or loaded (`status` without building it)."""
        return name in self._models or name in self._known

    def status(self) -> list[tuple[str, list[int], bool]]:
        """(name, loaded versions, ready) of every model on storage or loaded."""
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
            raise Unavailable(f"model {clip(name)} has no version loaded yet; retry later")
        served = sorted(set(self._known) | set(self._models))
        listed = clip(", ".join(served), 256, quote=False) if served else "(none)"
        raise NotFound(f"model {clip(name)} is not served; served models: {listed}")

    # -- polling ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll_forever(), name="fovea-manager")

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A failed listing changes nothing (poll_once logged it, throttled); anything else
                # is a bug, said at each poll.
                if exc is not self._scan_error:
                    log.exception(
                        "polling %s failed; retrying in %gs", self._source.base, self._settings.poll_interval
                    )
            await asyncio.sleep(self._settings.poll_interval)

    async def poll_once(self) -> None:
        """Scan storage once and converge on it; raises (changing nothing) if the scan fails.

        Storage that cannot be read, or that shows no version at all, retires nothing: a blip in a
        volume every replica shares would otherwise take every replica down at once. Only a readable
        listing that shows other versions but not a loaded one counts towards retiring it
        (`_hold_missing`).
        """
        loop = asyncio.get_running_loop()
        try:
            listed = await loop.run_in_executor(None, self._source.scan)
            nothing = (
                None if any(listed.values()) else await loop.run_in_executor(None, self._source.nothing_found)
            )
        except Exception as exc:
            self._scan_error = exc
            self._metrics.scan_failures.inc()
            self._storage_problem(
                failure_reason(exc), f"scanning {self._source.base} failed: {clip(exc, 300, quote=False)}"
            )
            raise
        if nothing is not None and self._models:
            self._storage_problem(*nothing)  # the rollouts read last keep applying too
            return
        for name in listed:
            await self._read_rollout(name)
        if nothing is not None:
            self._say_nothing_found(nothing[1])  # waiting for a first model
        else:
            self._nothing_said = None
            self._storage_back()
            listed = self._hold_missing(listed)
        self._known = [n for n, v in listed.items() if v]
        for name, versions in listed.items():
            # Versions the rollout file names stay loaded whatever the policy says.
            pinned = sorted(v for v in self.rollouts.pinned(name) if v in versions)
            aspired = sorted(set(self._aspired(versions)) | set(pinned))
            if self._settings.version_policy == "latest":
                await self._sync_latest(name, versions, pinned)  # the newest that loads, if it does not
            else:
                await self._sync_model(name, aspired)
            pending = [v for v in aspired if v not in self._models.get(name, {})]
            self._metrics.versions_pending.labels(name).set(len(pending))
        for name in [n for n in self._models if n not in listed]:
            self.rollouts.forget(name)
            log.info("model %s disappeared from %s; unloading it", name, self._source.base)
            await self._sync_model(name, [])
        self._last_seen_at = time.monotonic()
        self._metrics.last_scan.set(time.time())
        self._update_ready()

    # -- storage faults --------------------------------------------------------------------------

    def _storage_problem(self, reason: str, why: str) -> None:
        """A scan that cannot retire anything: counted each time, logged when it starts, when its
        reason changes and every OUTAGE_LOG_EVERY_S while it lasts."""
        self._metrics.storage_problems.labels(reason).inc()
        self._metrics.storage_unreachable.set(1)
        self._missing.clear()  # an outage breaks a run of listings that missed a version
        self._refresh_missing_gauge()
        now = time.monotonic()
        outage = self._outage
        if outage is None:
            outage = self._outage = _Outage(since=now, reason=reason, logged_at=now)
        else:
            outage.scans += 1
            if reason == outage.reason and now - outage.logged_at < OUTAGE_LOG_EVERY_S:
                return
            outage.reason, outage.logged_at = reason, now
        serving = self.loaded()
        kept = (
            f"keeping {len(serving)} loaded version(s) serving "
            f"({', '.join(f'{v.name}:{v.version}' for v in serving)})"
            if serving
            else "nothing is loaded yet"
        )
        log.error(
            "model storage unreachable (%s, %d scan(s) over %.0fs): %s; %s, retrying every %gs",
            reason,
            outage.scans,
            now - outage.since,
            why,
            kept,
            self._settings.poll_interval,
        )

    def _storage_back(self) -> None:
        outage, self._outage = self._outage, None
        self._metrics.storage_unreachable.set(0)
        if outage is not None:
            log.warning(
                "model storage %s is readable again after %.1fs (%d scan(s) failed or found nothing, "
                "last: %s); nothing was retired meanwhile",
                self._source.base,
                time.monotonic() - outage.since,
                outage.scans,
                outage.reason,
            )

    def _hold_missing(self, listed: dict[str, list[int]]) -> dict[str, list[int]]:
        """The listing plus every loaded version it misses whose removal is not confirmed yet.

        A version folder removed while the listing still shows others is a real removal, but a
        rename, a sync tool's swap or a flaky mount look the same for a moment: it is retired only
        once `retire_after_scans` scans in a row, over at least `retire_grace_s` since a scan last
        saw it, have missed it.
        """
        s = self._settings
        now = time.monotonic()
        held = {name: list(versions) for name, versions in listed.items()}
        still_missing: set[tuple[str, int]] = set()
        for name, versions in self._models.items():
            on_storage = set(listed.get(name, []))
            for version in sorted(versions):
                if version in on_storage:
                    continue
                key = (name, version)
                missing = self._missing.get(key)
                if missing is None:
                    missing = self._missing[key] = _Missing(last_seen=self._last_seen_at)
                missing.scans += 1
                gone_for = now - missing.last_seen
                if missing.scans >= s.retire_after_scans and gone_for >= s.retire_grace_s():
                    log.warning(
                        "%s version %d has been missing from %s for %d scans (%.1fs): retiring it",
                        name,
                        version,
                        self._source.root(name),
                        missing.scans,
                        gone_for,
                    )
                    del self._missing[key]
                    continue
                if missing.scans == 1:
                    log.warning(
                        "%s version %d is missing from %s; serving it on, and retiring it if %d scans "
                        "over %gs miss it",
                        name,
                        version,
                        self._source.root(name),
                        s.retire_after_scans,
                        s.retire_grace_s(),
                    )
                still_missing.add(key)
                held[name] = sorted({*held.get(name, []), version})
        for key in [k for k in self._missing if k not in still_missing]:
            del self._missing[key]
            if key[1] in self._models.get(key[0], {}):
                log.warning("%s version %d is back on storage", *key)
        self._refresh_missing_gauge()
        return held

    def _refresh_missing_gauge(self) -> None:
        counts = collections.Counter(name for name, _ in self._missing)
        for name in set(self._models) | set(counts):
            self._metrics.versions_missing.labels(name).set(counts.get(name, 0))

    def _say_nothing_found(self, why: str) -> None:
        now = time.monotonic()
        said = self._nothing_said
        if said is not None and said[0] == why and now - said[1] < NOTHING_FOUND_REMINDER_S:
            return
        self._nothing_said = (why, now)
        log.warning(
            "%s; %s: scanning every %gs, said again when this changes or every %d minutes "
            "(--no-wait-for-model-dir exits instead)",
            why,
            "still waiting for a model" if said is not None else "waiting for a model",
            self._settings.poll_interval,
            NOTHING_FOUND_REMINDER_S // 60,
        )

    async def _read_rollout(self, name: str) -> None:
        try:
            text = await asyncio.get_running_loop().run_in_executor(None, self._source.rollout, name)
        except Exception as exc:
            # Unreadable now (a storage hiccup): keep the last good file rather than drop the rollout.
            self._metrics.rollout_file_errors.labels(name).inc()
            log.warning(
                "reading the rollout file of %s failed; keeping the last good one: %s",
                name,
                clip(exc, 300, quote=False),
            )
            return
        self.rollouts.update(name, text)

    def _aspired(self, versions: list[int]) -> list[int]:
        """The versions the policy wants served, out of those on storage (ascending)."""
        if not versions:
            return []
        specific = self._settings.specific_versions()
        if specific is not None:
            return [v for v in versions if v in specific]
        if self._settings.version_policy == "all":
            return versions
        return [versions[-1]]

    async def _sync_latest(self, name: str, versions: list[int], pinned: list[int]) -> None:
        """Serve the newest version that loads: a broken newest one falls back to the next older.

        A version that failed to load is retried with exponential backoff, not at every poll, and
        reported (fovea_model_version_broken, the log). If the newest loads later, it replaces the
        fallback as any new version would.
        """
        current = self._models.get(name, {})
        wanted: list[int] = []
        for version in sorted(versions, reverse=True):
            if version in current:
                wanted = [version]
                break
            if self._backing_off(name, version):
                continue
            served = await self._load(name, version)
            if served is not None:
                self._models[name] = {**self._models.get(name, {}), version: served}
                wanted = [version]
                break
        if wanted or not versions:
            await self._sync_model(name, sorted(set(wanted) | set(pinned)))
        elif pinned:
            await self._sync_model(name, pinned)

    def _backing_off(self, name: str, version: int) -> bool:
        retry_at = self._retry_at.get((name, version))
        return retry_at is not None and time.monotonic() < retry_at

    async def _sync_model(self, name: str, wanted: list[int]) -> None:
        current = dict(self._models.get(name, {}))
        for version in wanted:
            if version in current or self._backing_off(name, version):
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
        path = posixpath.join(self._source.root(name), str(version))
        loop = asyncio.get_running_loop()
        s = self._settings
        sizes = warmup_sizes(s.max_batch_size, s.allowed_batch_sizes)
        log.info("loading %s version %d from %s", name, version, path)
        # Warm-up batches (and the XLA checks after it) wait for the serving versions' turn.
        pace = ServingFirst(self.serving_busy)
        try:
            start = time.monotonic()
            # The GIL handed over often: the load is mostly Python, and the serving threads need it too.
            model = await loop.run_in_executor(
                self._loader, handing_gil_often, self._load_model, path, name, version
            )
            loaded = time.monotonic()
            self._metrics.load_duration.labels(name).observe(loaded - start)
            if s.warmup:
                await loop.run_in_executor(self._loader, handing_gil_often, model.warm_up, sizes, pace.run)
                self._metrics.warmup_duration.labels(name).observe(time.monotonic() - loaded)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures = self._failures.get((name, version), 0) + 1
            self._failures[(name, version)] = failures
            # Exponential backoff from the poll interval, capped: a broken version is not reloaded
            # (and its memory churned) at every poll.
            backoff = min(s.poll_interval * 2 ** (failures - 1), MAX_RETRY_BACKOFF_S)
            self._retry_at[(name, version)] = time.monotonic() + backoff
            self._metrics.model_load_failures.labels(name).inc()
            self._metrics.version_broken.labels(name, str(version)).set(1)
            log.error(
                "loading %s version %d from %s failed (attempt %d; retrying in %gs, serving the newest "
                "version that loads meanwhile): %s",
                name,
                version,
                path,
                failures,
                backoff,
                clip(exc, 300, quote=False),
                exc_info=failures == 1,
            )
            return None
        if self._failures.pop((name, version), None) is not None:
            self._retry_at.pop((name, version), None)
            with contextlib.suppress(KeyError):
                self._metrics.version_broken.remove(name, str(version))
        served = ServedVersion(
            model,
            pool=self._pool,
            batcher_options=s.batcher_options(),
            stats=self._metrics.batcher_stats(name, version),
        )
        self._metrics.model_loads.labels(name).inc()
        self._metrics.version_info.labels(name, str(version)).set(1)
        log.info(
            "loaded %s version %d (%dx%d, %d classes) in %.2fs%s%s",
            name,
            version,
            model.metadata.input_height,
            model.metadata.input_width,
            len(model.metadata.labels),
            time.monotonic() - start,
            f", warmed batch sizes {sizes}" if s.warmup else ", warm-up off",
            f" ({pace.waited_s:.2f}s of it waiting for the serving versions' batches)"
            if pace.waited_s >= 0.01
            else "",
        )
        return served

    async def _retire(self, old: ServedVersion) -> None:
        await old.wait_idle()
        await old.close()
        # The same version may have been published again and loaded while this copy drained: its
        # metric series then belong to the new copy and stay.
        if self._models.get(old.name, {}).get(old.version) is None:
            with contextlib.suppress(KeyError):
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
                await served.close()
        self._models.clear()
        self._loader.shutdown(wait=False)
        self._pool.shutdown(wait=False)
