"""The transport-free core: the one seam every protocol calls.

A protocol adapter (servicer.py for fovea.v1; later KServe v2 and TF Serving's PredictionService)
translates its messages into these dataclasses, calls `Core`, translates the result back, and maps
`ServingError.code` to its own statuses (rpc.py does the generic part for gRPC servicers). The core
keeps requests, validation and results; the manager finds the version, the version does the work.
Nothing here imports grpc, protobuf or TensorFlow.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from fovea.contract import ModelMetadata
from fovea.server import imageinfo, tracing
from fovea.server.config import Settings
from fovea.server.errors import InvalidArgument, ServingError, Unavailable
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
    top_k: int = 0  # 0 for min(5, classes)
    return_probabilities: bool = False
    deadline: float | None = None  # time.monotonic() seconds


@dataclass
class Prediction:
    top: list[tuple[int, str, float]]  # (class index, label, probability), best first
    probabilities: np.ndarray | None = None  # float32 [classes] when asked for


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


@dataclass
class ModelStatus:
    name: str
    versions: list[int]  # loaded (serving) versions, ascending
    ready: bool  # at least one version serves


@dataclass
class VersionStatistics:
    """One loaded version's totals since it loaded; `totals` is a snapshot (a copy)."""

    name: str
    version: int
    queue_depth: int  # requests waiting for a batch now
    totals: VersionStats


class Core:
    """Requests in, results out; `predict`, `metadata`, `list_models`, readiness and statistics."""

    def __init__(self, settings: Settings, manager: ModelManager, metrics: Metrics) -> None:
        self._settings = settings
        self._manager = manager
        self._metrics = metrics
        self._running = Gate()  # predictions in flight; closed by drain()

    @property
    def draining(self) -> bool:
        return self._running.closed

    @property
    def ready(self) -> bool:
        """The server's readiness: some version serves and no drain has started."""
        return self._manager.ready and not self.draining

    async def drain(self, timeout: float) -> bool:
        """Refuse new predictions and wait for the running ones; False if the timeout passed first."""
        self._running.close()
        return await self._running.wait_idle(timeout)

    async def predict(self, request: PredictRequest) -> PredictResult:
        try:
            self._running.enter()
        except GateClosed:
            raise Unavailable("server is shutting down; retry on another replica") from None
        try:
            return await self._predict(request)
        finally:
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
        with self._manager.lookup(request.model_name, request.model_version).leased() as served:
            classes = len(served.metadata.labels)
            top_k = request.top_k
            if top_k == 0:
                top_k = min(5, classes)
            elif not 1 <= top_k <= classes:
                raise InvalidArgument(
                    f"top_k is {top_k}; it must be between 1 and {classes} (the model's classes), or 0 for "
                    "the default"
                )
            with tracing.span("decode", images=count):
                rows = await self._preprocess(request.images, served)
            timings: list | None = [] if tracing.enabled() else None
            probabilities = await served.infer(rows, request.deadline, timings)
            tracing.record_batches(timings)
        labels = served.metadata.labels
        # argsort on a stable, descending key: ties keep index order, as a reader would expect.
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        predictions = []
        for row, idx in zip(probabilities, order.tolist(), strict=True):
            top = [(i, labels[i], float(row[i])) for i in idx]
            predictions.append(Prediction(top, row if request.return_probabilities else None))
        return PredictResult(served.name, served.version, predictions)

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
            for i, row in (await served.preprocess(slow)).items():
                rows[i] = row
            self._metrics.preprocess_duration.labels(served.name).observe(time.perf_counter() - start)
        return rows  # type: ignore[return-value]

    def _validate(self, i: int, image, h: int, w: int) -> np.ndarray | None:
        """Raise InvalidArgument for a bad image; return the row when it needs no work, else None."""
        if isinstance(image, EncodedImage):
            if not image.data:
                raise InvalidArgument(f"images[{i}].encoded is empty")
            try:
                info = imageinfo.read_info(image.data)
            except imageinfo.UnreadableImage as exc:
                raise InvalidArgument(
                    f"images[{i}].encoded: {exc}; send JPEG, PNG, GIF or BMP bytes"
                ) from None
            if info.width == 0 or info.height == 0:
                raise InvalidArgument(
                    f"images[{i}].encoded: the {info.format} header says the image is empty"
                )
            self._check_pixels(i, info.width, info.height, info.frames)
            return None
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
            self._check_pixels(i, shape[1], shape[0], 1)
            expected = int(np.prod(shape)) * dtype.itemsize
            if len(image.data) != expected:
                raise InvalidArgument(
                    f"images[{i}].raw.data has {len(image.data)} bytes; shape {list(shape)} of {image.dtype} "
                    f"needs {expected}"
                )
            if dtype == np.uint8 and tuple(shape) == (h, w, 3):
                return np.frombuffer(image.data, np.uint8).reshape(h, w, 3)  # no copy
            return None
        raise InvalidArgument(f"images[{i}] is empty; set encoded or raw")

    def _check_pixels(self, i: int, width: int, height: int, frames: int) -> None:
        pixels = width * height * frames
        if pixels > self._settings.max_pixels:
            frames_text = f" x {frames} frames" if frames > 1 else ""
            raise InvalidArgument(
                f"images[{i}] is {width}x{height}{frames_text} = {pixels} pixels; this server accepts at most "
                f"{self._settings.max_pixels} (--max-pixels): downscale it before sending"
            )

    def metadata(self, name: str = "", version: int = 0) -> ModelDescription:
        served = self._manager.lookup(name, version)
        return ModelDescription(
            metadata=copy.deepcopy(served.metadata),
            loaded_versions=self._manager.loaded_versions(served.name),
            max_images_per_request=self._settings.max_images_per_request,
        )

    def list_models(self) -> list[ModelStatus]:
        """Every model on storage or loaded, with its loaded versions."""
        return [ModelStatus(n, v, r) for n, v, r in self._manager.status()]

    def model_ready(self, name: str = "", version: int = 0) -> bool:
        """Whether a spec resolves to a serving version now (never raises; False while draining)."""
        if self.draining:
            return False
        try:
            self._manager.lookup(name, version)
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
