"""The transport-free core: a validated request in, a result out.

gRPC (servicer.py) and any later protocol (KServe v2, TF Serving's PredictionService) translate their
messages into these dataclasses and map `ServingError.code` to their statuses. Nothing here imports
grpc, protobuf or TensorFlow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from fovea.server import imageinfo, tracing
from fovea.server.config import Settings
from fovea.server.errors import InvalidArgument, Unavailable

if TYPE_CHECKING:  # the repository pulls in the TensorFlow runner; the core only needs its shape
    from fovea.server.metrics import Metrics
    from fovea.server.repository import ModelRepository, ServedVersion

_DTYPES = {"uint8": np.dtype(np.uint8), "float32": np.dtype("<f4")}


@dataclass(frozen=True)
class EncodedImage:
    data: bytes


@dataclass(frozen=True)
class RawImage:
    dtype: str  # "uint8", "float32", or anything else (rejected)
    shape: tuple[int, ...]
    data: bytes


@dataclass
class PredictRequest:
    images: Sequence[EncodedImage | RawImage | None]
    model_name: str = ""
    model_version: int = 0
    top_k: int = 0
    return_probabilities: bool = False
    deadline: float | None = None  # time.monotonic() seconds


@dataclass
class Prediction:
    top: list[tuple[int, str, float]]
    probabilities: np.ndarray | None = None


@dataclass
class PredictResult:
    model_name: str
    model_version: int
    predictions: list[Prediction]


@dataclass
class ModelMetadata:
    name: str
    version: int
    labels: list[str]
    input_height: int
    input_width: int
    backbone: str
    loaded_versions: list[int]
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: str = ""
    max_images_per_request: int = 0


@dataclass
class ModelStatus:
    name: str
    versions: list[int]
    ready: bool


class Core:
    def __init__(self, settings: Settings, repository: ModelRepository, metrics: Metrics) -> None:
        self._settings = settings
        self._repository = repository
        self._metrics = metrics
        threads = settings.preprocess_threads or os.cpu_count() or 2
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="fovea-preprocess")
        self.draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    async def drain(self, timeout: float) -> bool:
        """Refuse new predictions and wait for the running ones; False if the timeout passed first."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def predict(self, request: PredictRequest) -> PredictResult:
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica")
        self._active += 1
        self._idle.clear()
        try:
            return await self._predict(request)
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def _predict(self, request: PredictRequest) -> PredictResult:
        count = len(request.images)
        if count == 0:
            raise InvalidArgument("the request has no images; send at least one")
        if count > self._settings.max_images_per_request:
            raise InvalidArgument(
                f"the request has {count} images; this server accepts at most "
                f"{self._settings.max_images_per_request} per request: split it"
            )
        served = self._repository.acquire(request.model_name, request.model_version)
        try:
            classes = len(served.info.labels)
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
            outputs = await served.batcher.submit(rows, request.deadline, timings)
            tracing.record_batches(timings)
        finally:
            served.release()
        probabilities = np.asarray(outputs, dtype=np.float32)
        labels = served.info.labels
        # argsort on a stable, descending key: ties keep index order, as a reader would expect.
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        predictions = []
        for row, idx in zip(probabilities, order.tolist(), strict=True):
            top = [(i, labels[i], float(row[i])) for i in idx]
            predictions.append(Prediction(top, row if request.return_probabilities else None))
        return PredictResult(served.name, served.version, predictions)

    async def _preprocess(self, images: Sequence, served: ServedVersion) -> list[np.ndarray]:
        """Validate every image on the loop (cheap), then decode/resize the rest on the pool."""
        h, w = served.info.height, served.info.width
        rows: list[np.ndarray | None] = []
        slow: list[int] = []
        for i, image in enumerate(images):
            ready = self._validate(i, image, h, w)
            rows.append(ready)
            if ready is None:
                slow.append(i)
        if slow:
            start = time.perf_counter()
            loop = asyncio.get_running_loop()
            done = await loop.run_in_executor(
                self._pool, _prepare, [(i, images[i]) for i in slow], served.runner
            )
            for i, row in zip(slow, done, strict=True):
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

    def metadata(self, name: str, version: int) -> ModelMetadata:
        served, versions = self._repository.served(name, version)
        info = served.info
        return ModelMetadata(
            name=info.name,
            version=info.version,
            labels=list(info.labels),
            input_height=info.height,
            input_width=info.width,
            backbone=info.backbone,
            loaded_versions=versions,
            metrics=dict(info.metrics),
            created_at=info.created_at,
            max_images_per_request=self._settings.max_images_per_request,
        )

    def list_models(self) -> list[ModelStatus]:
        return [ModelStatus(n, v, r) for n, v, r in self._repository.status()]


def _prepare(items: list[tuple[int, EncodedImage | RawImage]], runner) -> list[np.ndarray]:
    """On a pool thread: decode and resize each image to the model's uint8 [H, W, 3]."""
    h, w = runner.info.height, runner.info.width
    out = []
    for i, image in items:
        if isinstance(image, EncodedImage):
            try:
                out.append(runner.decode(image.data))
            except ValueError:
                raise InvalidArgument(
                    f"images[{i}].encoded could not be decoded; it looks truncated or corrupt"
                ) from None
            continue
        array = np.frombuffer(image.data, _DTYPES[image.dtype]).reshape(image.shape)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.shape[2] == 4:
            array = array[:, :, :3]  # alpha is dropped, as decode_image(channels=3) does
        elif array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        if array.dtype != np.uint8:
            # The proto: floats outside 0..255 are clipped (NaN counts as 0, infinities as the ends).
            array = np.clip(np.nan_to_num(array, nan=0.0, posinf=255.0, neginf=0.0), 0.0, 255.0)
            if array.shape[:2] == (h, w):
                out.append(np.rint(array).astype(np.uint8))
                continue
        if array.shape[:2] == (h, w):
            out.append(np.ascontiguousarray(array))
        else:
            out.append(runner.resize(np.ascontiguousarray(array)))
    return out
