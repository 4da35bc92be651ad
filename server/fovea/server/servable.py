"""A served version (TF Serving's "servable"): one loaded model, its batcher, its leases and its verbs.

`preprocess` turns the images the core validated into the model's uint8 [H, W, 3] rows on the shared
preprocessing pool; `infer` queues rows in the batcher and returns their probabilities. The core calls
these between `acquire()` and `release()`, so a version retired by a reload stays alive until its
last request is answered. No grpc and no TensorFlow here: the model is anything shaped like `Model`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from fovea.contract import ModelMetadata
from fovea.server.batch_admission import Ticket
from fovea.server.batcher import Batcher, BatcherStats, LowPriorityDropped
from fovea.server.errors import InvalidArgument
from fovea.server.lease import Gate


class Model(Protocol):
    """What the loader hands over (loader.LoadedModel); every call is blocking, made off the loop."""

    metadata: ModelMetadata  # input size filled in from the signature when fovea.json lacks it

    def predict(self, images: np.ndarray) -> np.ndarray: ...
    def decode(self, data: bytes) -> np.ndarray: ...
    def resize(self, image: np.ndarray) -> np.ndarray: ...
    def warm_up(self, batch_sizes: Sequence[int], pace: Callable[[Callable[[], object]], object]) -> None:
        """Run every batch size once, each model call as `pace(call)` (background.ServingFirst.run)."""

    def release(self) -> None: ...


@dataclass
class VersionStats:
    """Running totals of one version since it loaded (what KServe v2's ModelStatistics reports)."""

    requests: int = 0  # infer() calls answered
    failures: int = 0  # infer() calls that raised (shed, expired, model error)
    images: int = 0  # images computed (padding excluded)
    batches: int = 0  # model executions
    preprocess_s: float = 0.0  # decode/resize time, summed over requests
    queue_s: float = 0.0  # batch-queue waits, summed over requests
    compute_s: float = 0.0  # model time, summed over batches
    last_inference: float = 0.0  # time.time() of the last answered request, 0 if none


class _CountingStats(BatcherStats):
    """Adds the batcher's reports to a VersionStats, then passes them on (to Prometheus)."""

    def __init__(self, totals: VersionStats, inner: BatcherStats) -> None:
        self._totals = totals
        self._inner = inner

    def queue_depth(self, requests: int) -> None:
        self._inner.queue_depth(requests)

    def shed(self) -> None:
        self._inner.shed()

    def expired(self, requests: int) -> None:
        self._inner.expired(requests)

    def cancelled(self, requests: int) -> None:
        self._inner.cancelled(requests)

    def batch(self, images: int, padding: int, queue_waits: Sequence[float], compute_s: float) -> None:
        self._totals.images += images
        self._totals.batches += 1
        self._totals.queue_s += sum(queue_waits)
        self._totals.compute_s += compute_s
        self._inner.batch(images, padding, queue_waits, compute_s)


class ServedVersion:
    """A loaded, warm version; its `leases` gate counts the requests that resolved it."""

    def __init__(
        self,
        model: Model,
        *,
        pool: concurrent.futures.Executor,
        batcher_options: Mapping[str, object],
        stats: BatcherStats | None = None,
    ) -> None:
        self.model = model
        self.metadata = model.metadata
        self.stats = VersionStats()
        self.leases = Gate()
        self._pool = pool
        self._batcher = Batcher(
            model.predict,
            stats=_CountingStats(self.stats, stats or BatcherStats()),
            name=f"fovea-{self.name}-{self.version}",
            **batcher_options,  # type: ignore[arg-type]
        )
        self._batcher.start()
        # The warm-up's timings (a fake model in tests may have none).
        self._batcher.seed_costs(getattr(model, "warmup_seconds", {}))

    @property
    def prepare_s_per_image(self) -> float | None:
        """Learned pool seconds per image to decode/resize, None until an image was prepared."""
        return self._batcher.costs.decode_s_per_image

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> int:
        return self.metadata.version

    @property
    def queue_depth(self) -> int:
        return self._batcher.queue_depth

    # -- leases ----------------------------------------------------------------------------------

    def acquire(self) -> ServedVersion:
        self.leases.enter()
        return self

    def release(self) -> None:
        self.leases.exit()

    @contextlib.contextmanager
    def leased(self) -> Iterator[ServedVersion]:
        """Hold a lease for the block; take it right after the lookup, with no await in between."""
        with self.leases.held():
            yield self

    async def wait_idle(self) -> None:
        await self.leases.wait_idle()

    # -- verbs -----------------------------------------------------------------------------------

    def admit(
        self, rows: int, deadline: float | None = None, before: float = 0.0
    ) -> contextlib.AbstractContextManager[Ticket]:
        """Take a ticket in the batch queue for `rows` rows before preparing them, or shed at once.

        `before` is the expected wait for decoding, ahead of the queue."""
        return self._batcher.admit(rows, deadline, before)

    async def preprocess(
        self,
        images: Mapping[int, bytes | np.ndarray],
        check: Callable[[int, bytes], None] | None = None,
    ) -> dict[int, np.ndarray]:
        """Encoded bytes or [h, w] / [h, w, 1|3|4] uint8 or float32 arrays -> uint8 [H, W, 3] rows.

        Keys are the images' positions in the request (for error messages). Runs on the pool, where
        `check(i, data)` first vets every encoded image's header (so no parsing runs on the event
        loop); an undecodable image raises InvalidArgument.
        """
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        rows, busy = await loop.run_in_executor(self._pool, self._timed_prepare, list(images.items()), check)
        self.stats.preprocess_s += time.perf_counter() - start
        self._batcher.costs.learn_decode(len(images), busy)
        return dict(zip(images, rows, strict=True))

    async def infer(
        self,
        rows: Sequence[np.ndarray],
        deadline: float | None = None,
        timings: list | None = None,
        place: Ticket | None = None,
        low_priority: bool = False,
        yield_to: ServedVersion | None = None,
    ) -> np.ndarray:
        """uint8 [H, W, 3] rows -> float32 probabilities [len(rows), classes], batched with others.

        `deadline` is time.monotonic() seconds; the batcher drops the rows if it passes first.
        With `timings`, the batcher appends a BatchTiming per queue item (for traces).
        """
        try:
            outputs = await self._batcher.submit(
                rows,
                deadline,
                timings,
                place=place,
                low_priority=low_priority,
                yield_to=None if yield_to is None else yield_to.busy,
            )
        except LowPriorityDropped:
            raise  # a shadow run making way for live work: not a failure of this version
        except Exception:
            self.stats.failures += 1
            raise
        self.stats.requests += 1
        self.stats.last_inference = time.time()
        return np.asarray(outputs, dtype=np.float32)

    def busy(self) -> bool:
        """This version has work queued, being decoded or computing (a shadow run yields to it)."""
        return self._batcher.busy

    async def close(self) -> None:
        """Finish what is queued, then free the model (call once no lease is held)."""
        await self._batcher.close(drain=True)
        self.model.release()

    def _timed_prepare(
        self, items: list[tuple[int, bytes | np.ndarray]], check: Callable[[int, bytes], None] | None
    ) -> tuple[list[np.ndarray], float]:
        start = time.perf_counter()
        return self._prepare(items, check), time.perf_counter() - start

    def _prepare(
        self, items: list[tuple[int, bytes | np.ndarray]], check: Callable[[int, bytes], None] | None
    ) -> list[np.ndarray]:
        """On a pool thread: decode and resize each image to the model's uint8 [H, W, 3]."""
        h, w = self.metadata.input_height, self.metadata.input_width
        if check is not None:  # every header before any decode: a bad last image wastes no work
            for i, image in items:
                if isinstance(image, bytes):
                    check(i, image)
        out = []
        for i, image in items:
            if isinstance(image, bytes):
                try:
                    out.append(self.model.decode(image))
                except ValueError:
                    raise InvalidArgument(
                        f"images[{i}].encoded could not be decoded; it looks truncated or corrupt"
                    ) from None
                continue
            array = image
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
                out.append(self.model.resize(np.ascontiguousarray(array)))
        return out
