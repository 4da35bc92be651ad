"""The transport-free core: the one seam every protocol calls.

A protocol adapter (servicer.py for fovea.v1; later KServe v2 and TF Serving's PredictionService)
translates its messages into these dataclasses, calls `Core`, translates the result back, and maps
`ServingError.code` to its own statuses (rpc.py does the generic part for gRPC servicers). The core
keeps requests, validation and results; the manager finds the version, the version does the work.
Nothing here imports grpc, protobuf or TensorFlow.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from fovea.contract import ModelMetadata
from fovea.server import abstention, imageinfo, rollout, tracing
from fovea.server.config import Settings
from fovea.server.errors import InvalidArgument, ResourceExhausted, ServingError, Unavailable
from fovea.server.lease import Gate, GateClosed
from fovea.server.servable import VersionStats

if TYPE_CHECKING:
    from fovea.server.manager import ModelManager
    from fovea.server.metrics import Metrics
    from fovea.server.servable import ServedVersion

_DTYPES = {"uint8": np.dtype(np.uint8), "float32": np.dtype("<f4")}


@dataclass(frozen=True)
class EncodedImage:
    """JPEG, PNG, GIF or BMP bytes; decoded and resized to the model's input size."""

    data: bytes


@dataclass(frozen=True)
class RawImage:
    """Pixels, row-major: shape [H, W] or [H, W, 1|3|4]; resized when not the model's size."""

    dtype: str  # "uint8", "float32" (little-endian, clipped to 0..255), or anything else (rejected)
    shape: tuple[int, ...]
    data: bytes


@dataclass
class PredictRequest:
    images: Sequence[EncodedImage | RawImage | None]  # None: the caller sent an empty image
    model_name: str = ""  # "" for the only model served
    model_version: int = 0  # 0 for the latest loaded; negative is INVALID_ARGUMENT
    model_label: str = ""  # a version label of the model's rollout file, instead of model_version
    route_key: str = ""  # a sticky routing key (x-fovea-route-key) for requests naming no version
    top_k: int = 0  # 0 for min(5, classes)
    return_probabilities: bool = False
    deadline: float | None = None  # time.monotonic() seconds
    min_score: float = 0.0  # abstain below this top score (0..1; 0: never)
    use_model_threshold: bool = False  # abstain below the version's recorded threshold instead


@dataclass
class Prediction:
    top: list[tuple[int, str, float]]  # (class index, label, probability), best first
    probabilities: np.ndarray | None = None  # float32 [classes] when asked for
    abstained: bool = False  # the top score is below the threshold the request asked for


@dataclass
class PredictResult:
    model_name: str
    model_version: int
    predictions: list[Prediction]  # one per image, in request order


@dataclass
class ModelDescription:
    """What a metadata call answers: the version's fovea.json, the model's loaded versions, the limit."""

    metadata: ModelMetadata  # a copy; input size filled in from the signature when the file lacks it
    loaded_versions: list[int]
    max_images_per_request: int
    labels: dict[str, int] = dataclasses.field(default_factory=dict)  # the model's version labels


@dataclass
class ModelStatus:
    name: str
    versions: list[int]  # loaded (serving) versions, ascending
    ready: bool  # at least one version serves
    labels: dict[str, int] = dataclasses.field(default_factory=dict)  # version labels (rollout.json)


@dataclass
class VersionStatistics:
    """One loaded version's totals since it loaded; `totals` is a snapshot (a copy)."""

    name: str
    version: int
    queue_depth: int  # requests waiting for a batch now
    totals: VersionStats


class _InFlight:
    """Images and bytes one replica holds (decoding, queued or computing); refuses beyond its bounds.

    Checked before anything is decoded, so overload costs a refusal, not memory: without it, a burst
    of large JPEGs at 4x capacity queued 6 GB of decode work behind a model queue that never filled.
    """

    def __init__(self, max_images: int, max_bytes: int, metrics: Metrics) -> None:
        self.max_images, self.max_bytes = max_images, max_bytes
        self.images, self.bytes = Gate(), Gate()  # never closed: the bounds below refuse instead
        self._metrics = metrics

    @contextlib.contextmanager
    def hold(self, images: int, size: int) -> Iterator[None]:
        held_images, held_bytes = self.images.count, self.bytes.count
        # A lone request is always admitted (it passed the per-request limits), so nothing starves.
        if held_images and (held_images + images > self.max_images or held_bytes + size > self.max_bytes):
            self._metrics.shed_inflight.inc()
            raise ResourceExhausted(
                f"server overloaded: {held_images} images ({held_bytes / 2**20:.0f} MiB) already in flight "
                f"(--max-inflight-images {self.max_images}, --max-inflight-mb {self.max_bytes // 2**20}); "
                "retry with backoff or on another replica"
            )
        try:
            with self.images.held(images), self.bytes.held(size):
                self._report()
                yield
        finally:
            self._report()

    def _report(self) -> None:
        self._metrics.inflight_images.set(self.images.count)
        self._metrics.inflight_bytes.set(self.bytes.count)


class Core:
    """Requests in, results out; `predict`, `metadata`, `list_models`, readiness and statistics."""

    def __init__(self, settings: Settings, manager: ModelManager, metrics: Metrics) -> None:
        self._settings = settings
        self._manager = manager
        self._metrics = metrics
        self._running = Gate()  # predictions in flight; closed by drain()
        self._tasks: set[asyncio.Task] = set()  # their tasks, stopped if the drain times out
        self._shadows: set[asyncio.Task] = set()  # shadow runs after their live answers (rollout.py)
        self._aborting = False
        self._decoding = Gate()  # encoded images admitted and not yet decoded (never closed)
        self._decode_threads = settings.decode_threads()
        self._inflight = _InFlight(settings.max_inflight_images, settings.max_inflight_mb * 2**20, metrics)

    @property
    def draining(self) -> bool:
        return self._running.closed

    @property
    def ready(self) -> bool:
        """The server's readiness: some version serves and no drain has started."""
        return self._manager.ready and not self.draining

    async def drain(self, timeout: float) -> bool:
        """Refuse new predictions and wait for the running ones; False if the timeout passed first.

        When the timeout passes, the predictions still running are stopped and answer UNAVAILABLE
        (retry elsewhere), not CANCELLED: they are given a moment to send that answer.
        """
        self._running.close()
        if await self._running.wait_idle(timeout):
            return True
        self._aborting = True
        for task in list(self._tasks):
            task.cancel()
        await self._running.wait_idle(1.0)
        return False

    async def predict(self, request: PredictRequest) -> PredictResult:
        try:
            self._running.enter()
        except GateClosed:
            raise Unavailable("server is shutting down; retry on another replica") from None
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            return await self._predict(request)
        except asyncio.CancelledError:
            if not self._aborting:
                raise  # the caller left or its deadline passed
            if hasattr(task, "uncancel"):  # Python 3.11+: this task goes on to answer the caller
                task.uncancel()
            raise Unavailable(
                "server is shutting down and its grace period ended before this request finished; retry"
            ) from None
        finally:
            self._tasks.discard(task)
            self._running.exit()

    async def _predict(self, request: PredictRequest) -> PredictResult:
        count = len(request.images)
        if count == 0:
            raise InvalidArgument("the request has no images; send at least one")
        if count > self._settings.max_images_per_request:
            raise InvalidArgument(
                f"the request has {count} images; this server accepts at most "
                f"{self._settings.max_images_per_request} per request: split it"
            )
        served = self._manager.lookup(
            request.model_name, request.model_version, request.model_label, request.route_key
        )
        shadow = self._manager.rollouts.sample_shadow(served.name)
        started = time.perf_counter()
        try:
            result, rows = await self._predict_on(request, served, keep_scores=bool(shadow))
        except ServingError as exc:
            self._count_version(served, request, exc.code)
            raise
        except Exception:
            self._count_version(served, request, "INTERNAL")  # what rpc.py answers for it
            raise
        self._count_version(served, request, "OK")
        self._metrics.version_durations(served.name, str(served.version)).observe(
            time.perf_counter() - started
        )
        if shadow:
            scores = np.stack([p.probabilities for p in result.predictions])
            if not request.return_probabilities:
                for p in result.predictions:
                    p.probabilities = None
            task = asyncio.get_running_loop().create_task(
                rollout.run_shadow(self._metrics, self._manager, served, shadow, rows, scores)
            )
            self._shadows.add(task)  # a reference, so the task is not collected mid-run
            task.add_done_callback(self._shadows.discard)
        return result

    def _count_version(self, served: ServedVersion, request: PredictRequest, code: str) -> None:
        label = request.model_label
        if not label:
            current = self._manager.rollouts.get(served.name)
            label = ",".join(current.labels_of(served.version)) if current else ""
        self._metrics.version_counts(served.name, str(served.version), label, code).inc()

    async def _predict_on(
        self, request: PredictRequest, served: ServedVersion, keep_scores: bool
    ) -> tuple[PredictResult, list[np.ndarray]]:
        count = len(request.images)
        with served.leased():
            classes = len(served.metadata.labels)
            top_k = request.top_k
            if top_k == 0:
                top_k = min(5, classes)
            elif not 1 <= top_k <= classes:
                raise InvalidArgument(
                    f"top_k is {top_k}; it must be between 1 and {classes} (the model's classes), or 0 for "
                    "the default"
                )
            limit = abstention.threshold(request.min_score, request.use_model_threshold, served.metadata)
            # Admission before anything is parsed or decoded: the replica's images and bytes in
            # flight, then the version's queue in count and expected wait.
            size = sum(len(image.data) for image in request.images if image is not None)
            decode = sum(isinstance(image, EncodedImage) for image in request.images)
            with (
                self._inflight.hold(count, size),
                served.admit(count, request.deadline, self._decode_wait(served, decode)) as place,
                self._decoding.held(decode) as decoding,
            ):
                with tracing.span("decode", images=count):
                    rows = await self._preprocess(request.images, served)
                decoding.release()
                timings: list | None = [] if tracing.enabled() else None
                probabilities = await served.infer(rows, request.deadline, timings, place=place)
                tracing.record_batches(timings)
        labels = served.metadata.labels
        keep = request.return_probabilities or keep_scores
        # argsort on a stable, descending key: ties keep index order, as a reader would expect.
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        predictions = []
        for row, idx in zip(probabilities, order.tolist(), strict=True):
            top = [(i, labels[i], float(row[i])) for i in idx]
            abstained = abstention.abstains(top[0][2], limit)
            predictions.append(Prediction(top, row if keep else None, abstained))
        if limit is not None:
            self._metrics.count_abstentions(served.name, served.version, predictions)
        top1, version = self._metrics.version_top1s, str(served.version)
        for index in order[:, 0].tolist():
            top1(served.name, version, labels[index]).inc()
        return PredictResult(served.name, served.version, predictions), rows

    def _decode_wait(self, served: ServedVersion, images: int) -> float:
        """Expected seconds until `images` more encoded images are decoded: the decode pool's queue."""
        per_image = served.prepare_s_per_image
        if per_image is None or not images:
            return 0.0
        return (self._decoding.count + images) * per_image / self._decode_threads

    async def _preprocess(self, images: Sequence, served: ServedVersion) -> list[np.ndarray]:
        """Validate every image on the loop (cheap), then let the version decode/resize the rest."""
        h, w = served.metadata.input_height, served.metadata.input_width
        rows: list[np.ndarray | None] = []
        slow: dict[int, bytes | np.ndarray] = {}
        for i, image in enumerate(images):
            ready = self._validate(i, image, h, w)
            rows.append(ready)
            if ready is None:
                if isinstance(image, EncodedImage):
                    slow[i] = image.data
                else:  # a validated RawImage: a view of its bytes, converted on the pool
                    slow[i] = np.frombuffer(image.data, _DTYPES[image.dtype]).reshape(image.shape)
        if slow:
            start = time.perf_counter()
            for i, row in (await served.preprocess(slow, self._check_encoded)).items():
                rows[i] = row
            self._metrics.preprocess_duration.labels(served.name).observe(time.perf_counter() - start)
        return rows  # type: ignore[return-value]

    def _validate(self, i: int, image, h: int, w: int) -> np.ndarray | None:
        """Raise InvalidArgument for a bad image; return the row when it needs no work, else None.

        Encoded images are only checked for emptiness here; their headers are read on the pool
        (`_check_encoded`), since walking a large GIF or JPEG header must not stall the event loop.
        """
        if isinstance(image, EncodedImage):
            if not image.data:
                raise InvalidArgument(f"images[{i}].encoded is empty")
            return None
        return self._validate_raw(i, image, h, w)

    def _check_encoded(self, i: int, data: bytes) -> None:
        """On a pool thread, before any decode: refuse what the header says the decoder cannot afford."""
        try:
            info = imageinfo.read_info(data)
        except imageinfo.UnreadableImage as exc:
            raise InvalidArgument(f"images[{i}].encoded: {exc}; send JPEG, PNG, GIF or BMP bytes") from None
        if info.width == 0 or info.height == 0:
            raise InvalidArgument(f"images[{i}].encoded: the {info.format} header says the image is empty")
        if info.pixels > self._settings.max_pixels:
            frames = f" in {info.frames} frames" if info.frames > 1 else ""
            raise InvalidArgument(
                f"images[{i}] is a {info.width}x{info.height} {info.format} that decodes "
                f"{info.pixels} pixels{frames}; this server accepts at most {self._settings.max_pixels} "
                "(--max-pixels): downscale it before sending"
            )

    def _validate_raw(self, i: int, image, h: int, w: int) -> np.ndarray | None:
        if isinstance(image, RawImage):
            dtype = _DTYPES.get(image.dtype)
            if dtype is None:
                raise InvalidArgument(f"images[{i}].raw.dtype must be DATA_TYPE_UINT8 or DATA_TYPE_FLOAT32")
            shape = image.shape
            if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
                raise InvalidArgument(
                    f"images[{i}].raw.shape is {list(shape)}; use [height, width] or [height, width, channels] "
                    "with 1, 3 or 4 channels"
                )
            if shape[0] < 1 or shape[1] < 1:
                raise InvalidArgument(
                    f"images[{i}].raw.shape is {list(shape)}; height and width must be positive"
                )
            self._check_pixels(i, shape[1], shape[0])
            expected = math.prod(shape) * dtype.itemsize  # np.prod of a tuple costs microseconds a request
            if len(image.data) != expected:
                raise InvalidArgument(
                    f"images[{i}].raw.data has {len(image.data)} bytes; shape {list(shape)} of {image.dtype} "
                    f"needs {expected}"
                )
            if dtype == np.uint8 and tuple(shape) == (h, w, 3):
                return np.frombuffer(image.data, np.uint8).reshape(h, w, 3)  # no copy
            return None
        raise InvalidArgument(f"images[{i}] is empty; set encoded or raw")

    def _check_pixels(self, i: int, width: int, height: int) -> None:
        pixels = width * height
        if pixels > self._settings.max_pixels:
            raise InvalidArgument(
                f"images[{i}] is {width}x{height} = {pixels} pixels; this server accepts at most "
                f"{self._settings.max_pixels} (--max-pixels): downscale it before sending"
            )

    def metadata(
        self,
        name: str = "",
        version: int = 0,
        label: str = "",
        route_key: str | None = None,
    ) -> ModelDescription:
        """A version's description, a copy the caller may change. `route_key` is for adapters
        resolving a prediction's version (traffic shares apply); None for a metadata call (the
        largest share's label answers). A prediction reads `served_metadata` instead."""
        served = self._manager.lookup(name, version, label, route_key)
        return ModelDescription(
            metadata=copy.deepcopy(served.metadata),
            loaded_versions=self._manager.loaded_versions(served.name),
            max_images_per_request=self._settings.max_images_per_request,
            labels=self._manager.labels(served.name),
        )

    def served_metadata(
        self, name: str = "", version: int = 0, label: str = "", route_key: str | None = None
    ) -> ModelMetadata:
        """The fovea.json of the version a prediction's spec resolves to now (traffic shares apply
        through `route_key`), shared and read-only: what an adapter reads before `predict` (input
        size, labels, version). `metadata`'s deep copy cost a KServe v2 infer tens of µs per call."""
        return self._manager.lookup(name, version, label, route_key).metadata

    def list_models(self) -> list[ModelStatus]:
        """Every model on storage or loaded, with its loaded versions."""
        return [ModelStatus(n, v, r, self._manager.labels(n)) for n, v, r in self._manager.status()]

    def knows(self, name: str) -> bool:
        """Whether `name` is one of `list_models`' names (cheap: protocol adapters ask per request)."""
        return self._manager.knows(name)

    def model_ready(self, name: str = "", version: int = 0, label: str = "") -> bool:
        """Whether a spec resolves to a serving version now (never raises; False while draining)."""
        if self.draining:
            return False
        try:
            self._manager.lookup(name, version, label)
        except ServingError:
            return False
        return True

    def statistics(self, name: str = "", version: int = 0) -> list[VersionStatistics]:
        """Totals of loaded versions: all of them when `name` is "", else the versions of `name`
        (only `version` when it is not 0). A model or version not loaded gives an empty list."""
        return [
            VersionStatistics(s.name, s.version, s.queue_depth, dataclasses.replace(s.stats))
            for s in self._manager.loaded()
            if (not name or s.name == name) and (not version or s.version == version)
        ]
