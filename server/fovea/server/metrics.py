"""Prometheus metrics: one registry per server instance (tests run several), names fovea_*_<unit>.

Durations and batch sizes are histograms, so they aggregate across pods. No `*_created` series: they
double every counter and histogram on /metrics and no alert or dashboard of ours reads them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from fovea.server.batcher import BatcherStats
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

disable_created_metrics()

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LOAD = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Children:
    """The labelled children of one metric, each looked up once.

    `labels()` validates its values, takes the metric's lock and looks the child up on every call:
    about 2 µs, which the request path paid five times per call. The children are never removed, so
    a cached one always stays the exported one.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Counter | Histogram) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], object] = {}

    def __call__(self, *labels: str):  # the child: a Counter or Histogram of its own
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


class Metrics:
    """Every metric the server exports, registered in its own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # `protocol` is the API a call came in on (fovea.v1 today), so methods of the same name in
        # different protocols are counted apart.
        self.requests = Counter(
            "fovea_requests",
            "RPCs finished, by protocol, method and gRPC status code.",
            ["protocol", "method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "fovea_request_duration_seconds",
            "RPC handling time, by protocol and method.",
            ["protocol", "method"],
            buckets=_LATENCY,
            registry=r,
        )
        self.preprocess_duration = Histogram(
            "fovea_preprocess_duration_seconds",
            "Time to validate, decode and resize one request's images.",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_duration = Histogram(
            "fovea_queue_duration_seconds",
            "Time a request waited in the batch queue.",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.compute_duration = Histogram(
            "fovea_compute_duration_seconds",
            "Time of one model call on a batch.",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            "fovea_batch_size_images", "Real images per model call.", ["model"], buckets=_SIZES, registry=r
        )
        self.batch_padding = Histogram(
            "fovea_batch_padding_images",
            "Padding images added to reach an allowed batch size.",
            ["model"],
            buckets=(0, *_SIZES),
            registry=r,
        )
        self.images = Counter("fovea_images_inferred", "Images computed by a model.", ["model"], registry=r)
        self.batches = Counter("fovea_batches", "Model calls on batches.", ["model"], registry=r)
        self.shed = Counter(
            "fovea_shed_requests",
            "Requests refused because the batch queue was full or its expected wait too long.",
            ["model"],
            registry=r,
        )
        self.scan_failures = Counter(
            "fovea_model_dir_scan_failures",
            "Scans of the model folder that failed (nothing was changed; retried at the next poll).",
            registry=r,
        )
        self.storage_problems = Counter(
            "fovea_model_dir_problems",
            "Scans of the model folder that could not be trusted to retire anything, by reason: "
            "permission_denied, io_error or error (the listing raised), model_dir_missing, "
            "model_dir_empty or no_complete_version (it found no version at all while some serve).",
            ["reason"],
            registry=r,
        )
        self.storage_unreachable = Gauge(
            "fovea_model_dir_unreachable",
            "1 while the last scan failed or found no version at all while versions serve from memory.",
            registry=r,
        )
        self.versions_missing = Gauge(
            "fovea_model_versions_missing",
            "Loaded versions a readable listing no longer shows, serving on until the removal is "
            "confirmed (--retire-after-scans).",
            ["model"],
            registry=r,
        )
        self.version_broken = Gauge(
            "fovea_model_version_broken",
            "1 for a version on storage that failed to load and is retried with backoff.",
            ["model", "version"],
            registry=r,
        )
        self.shed_inflight = Counter(
            "fovea_shed_inflight_requests",
            "Requests refused before decoding because the replica held its most images or bytes.",
            registry=r,
        )
        self.inflight_images = Gauge(
            "fovea_inflight_images",
            "Images admitted and not yet answered (decoding, queued, computing).",
            registry=r,
        )
        self.inflight_bytes = Gauge(
            "fovea_inflight_bytes", "Encoded and raw image bytes of the admitted requests.", registry=r
        )
        self.expired = Counter(
            "fovea_expired_requests",
            "Requests dropped before compute because their deadline had passed.",
            ["model"],
            registry=r,
        )
        self.cancelled = Counter(
            "fovea_cancelled_requests",
            "Requests dropped before compute because the caller left.",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "fovea_queue_depth_requests", "Requests waiting for a batch.", ["model", "version"], registry=r
        )
        self.queue_capacity = Gauge(
            "fovea_queue_capacity_requests",
            "Requests one model version's queue holds before shedding (--max-queue-size).",
            registry=r,
        )
        self.model_loads = Counter(
            "fovea_model_loads", "Model versions loaded and warmed successfully.", ["model"], registry=r
        )
        self.model_load_failures = Counter(
            "fovea_model_load_failures", "Model version loads or warm-ups that failed.", ["model"], registry=r
        )
        self.load_duration = Histogram(
            "fovea_model_load_duration_seconds", "SavedModel load time.", ["model"], buckets=_LOAD, registry=r
        )
        self.warmup_duration = Histogram(
            "fovea_model_warmup_duration_seconds",
            "Warm-up time of a loaded version.",
            ["model"],
            buckets=_LOAD,
            registry=r,
        )
        self.version_info = Gauge(
            "fovea_model_version_info",
            "1 for every loaded, serving model version.",
            ["model", "version"],
            registry=r,
        )
        self.ready = Gauge("fovea_ready", "1 when the server is SERVING, else 0.", registry=r)
        # The abstention share is abstained / (abstained + answered), over any window: counters
        # aggregate across pods, a ratio gauge would not.
        self.thresholded = Counter(
            "fovea_thresholded_predictions",
            "Predictions of requests that asked for a score threshold, by model, version and outcome "
            "(answered or abstained).",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.versions_pending = Gauge(
            "fovea_model_versions_pending",
            "Versions the policy wants, found on disk, but not serving after the last scan.",
            ["model"],
            registry=r,
        )
        self.last_scan = Gauge(
            "fovea_repository_last_scan_timestamp_seconds",
            "When the model directory was last scanned successfully (Unix time).",
            registry=r,
        )
        # Rollouts (rollout.py): per-version outcomes so a canary's latency, errors and answers can be
        # compared with stable's, and the agreement of shadow runs with the live answers.
        self.rollout_file_errors = Counter(
            "fovea_rollout_file_errors",
            "Polls that found an invalid rollout.json (the last good one kept serving).",
            ["model"],
            registry=r,
        )
        self.version_predictions = Counter(
            "fovea_version_predictions",
            "Predictions that resolved a version, by version, label and outcome (ok or a gRPC code).",
            ["model", "version", "label", "code"],
            registry=r,
        )
        self.version_duration = Histogram(
            "fovea_version_predict_duration_seconds",
            "Time from version resolution to result, per version.",
            ["model", "version"],
            buckets=_LATENCY,
            registry=r,
        )
        self.version_top1 = Counter(
            "fovea_version_top1",
            "Images answered, by version and top-1 class (the class distribution of each version).",
            ["model", "version", "class"],
            registry=r,
        )
        self.shadow_requests = Counter(
            "fovea_shadow_requests",
            "Sampled live requests for the shadow version, by outcome: computed, dropped_busy (live work "
            "was queued), dropped_unloaded, dropped_input_size, failed.",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.shadow_images = Counter(
            "fovea_shadow_images", "Images computed on the shadow version.", ["model", "version"], registry=r
        )
        self.shadow_top1_equal = Counter(
            "fovea_shadow_top1_equal",
            "Shadow images whose top-1 class equals the live answer's.",
            ["model", "version"],
            registry=r,
        )
        self.shadow_abs_diff = Counter(
            "fovea_shadow_score_abs_diff_sum",
            "Sum over shadow images of the mean absolute difference of class scores, live vs shadow "
            "(divide by fovea_shadow_images for the mean).",
            ["model", "version"],
            registry=r,
        )
        self.shadow_confusion = Counter(
            "fovea_shadow_top1_pairs",
            "Shadow images by live top-1 class and shadow top-1 class.",
            ["model", "version", "live", "shadow"],
            registry=r,
        )
        # The metrics every request counts, by label values (see Children).
        self.request_counts = Children(self.requests)
        self.request_durations = Children(self.request_duration)
        self.version_counts = Children(self.version_predictions)
        self.version_durations = Children(self.version_duration)
        self.version_top1s = Children(self.version_top1)
        # process_resident_memory_bytes, process_cpu_seconds_total...: the per-instance registry does
        # not get the default registry's process collector.
        ProcessCollector(registry=r)
        self._http = None
        self._http_thread: threading.Thread | None = None

    def count_abstentions(self, model: str, version: int, predictions: Sequence) -> None:
        abstained = sum(1 for p in predictions if p.abstained)
        if abstained:
            self.thresholded.labels(model, str(version), "abstained").inc(abstained)
        if len(predictions) - abstained:
            self.thresholded.labels(model, str(version), "answered").inc(len(predictions) - abstained)

    def batcher_stats(self, model: str, version: int) -> BatcherStats:
        return _ModelStats(self, model, str(version))

    def serve_http(
        self, host: str, port: int, certfile: str = "", keyfile: str = "", client_cafile: str = ""
    ) -> int:
        """Start /metrics on its own port (0 picks one), over TLS with a certificate; return the port."""
        self._http, self._http_thread = start_http_server(
            port,
            addr=host,
            registry=self.registry,
            certfile=certfile or None,
            keyfile=keyfile or None,
            client_cafile=client_cafile or None,
            client_auth_required=bool(client_cafile),
        )
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _ModelStats(BatcherStats):
    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._m = metrics
        self._depth = metrics.queue_depth.labels(model, version)
        self._shed = metrics.shed.labels(model)
        self._expired = metrics.expired.labels(model)
        self._cancelled = metrics.cancelled.labels(model)
        self._queue = metrics.queue_duration.labels(model)
        self._compute = metrics.compute_duration.labels(model)
        self._size = metrics.batch_size.labels(model)
        self._padding = metrics.batch_padding.labels(model)
        self._images = metrics.images.labels(model)
        self._batches = metrics.batches.labels(model)

    def queue_depth(self, requests: int) -> None:
        self._depth.set(requests)

    def shed(self) -> None:
        self._shed.inc()

    def expired(self, requests: int) -> None:
        self._expired.inc(requests)

    def cancelled(self, requests: int) -> None:
        self._cancelled.inc(requests)

    def batch(self, images: int, padding: int, queue_waits: Sequence[float], compute_s: float) -> None:
        for wait in queue_waits:
            self._queue.observe(wait)
        self._compute.observe(compute_s)
        self._size.observe(images)
        self._padding.observe(padding)
        self._images.inc(images)
        self._batches.inc()
