"""Dynamic batching in plain asyncio: requests queue, batches form, a worker thread computes them.

No grpc and no TensorFlow here: `infer` is any function from a stacked batch to one output row per
input row, so tests drive this with a fake model in milliseconds. The rules follow Ray Serve's
batcher: time is measured with a monotonic clock from the first queued item; cancelled futures are
dropped before a batch runs; a result is set only `if not fut.done()`; the number of results is
checked against the batch.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from fovea.server.errors import DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


class BatcherStats:
    """Hooks the batcher reports through; the defaults do nothing (metrics.py fills them in)."""

    def queue_depth(self, requests: int) -> None: ...
    def shed(self) -> None: ...
    def expired(self, requests: int) -> None: ...
    def cancelled(self, requests: int) -> None: ...
    def batch(self, images: int, padding: int, queue_waits: Sequence[float], compute_s: float) -> None: ...


@dataclass
class BatchTiming:
    """When one queue item waited and ran (batcher clock), for callers that trace requests."""

    enqueued: float
    started: float = 0.0
    finished: float = 0.0
    batch_images: int = 0


@dataclass(eq=False)
class _Item:
    rows: Sequence[np.ndarray]
    future: asyncio.Future
    deadline: float | None
    enqueued: float
    timing: BatchTiming | None = None


def warmup_sizes(max_batch_size: int, allowed_batch_sizes: Sequence[int]) -> list[int]:
    """Every batch size the batcher can hand to the model."""
    if not allowed_batch_sizes:
        return sorted({1, max_batch_size})
    allowed = sorted(set(allowed_batch_sizes))
    top = allowed[bisect.bisect_left(allowed, max_batch_size)]
    return [s for s in allowed if s <= top]


class Batcher:
    """Queues rows from many callers, runs them through `infer` in batches, returns each its own rows.

    `infer(batch)` gets an array [size, ...] (rows stacked, zero-padded up to an allowed size) and
    must return a sequence of exactly `size` output rows. It runs on a worker thread, at most
    `max_in_flight` at once.
    """

    def __init__(
        self,
        infer: Callable[[np.ndarray], Sequence],
        *,
        max_batch_size: int,
        batch_timeout_s: float = 0.0,
        allowed_batch_sizes: Sequence[int] = (),
        max_in_flight: int = 1,
        max_queue_size: int = 256,
        stats: BatcherStats | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "batcher",
    ) -> None:
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.batch_timeout_s = batch_timeout_s
        self._allowed = sorted(set(allowed_batch_sizes))
        if self._allowed and self._allowed[-1] < max_batch_size:
            raise ValueError("the largest allowed batch size must be at least max_batch_size")
        self.max_in_flight = max_in_flight
        self.max_queue_size = max_queue_size
        self._stats = stats or BatcherStats()
        self._clock = clock
        self.name = name
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_in_flight, thread_name_prefix=name)
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._loop_task: asyncio.Task | None = None

    # -- public ---------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def submit(
        self, rows: Sequence[np.ndarray], deadline: float | None = None, timings: list | None = None
    ) -> list:
        """Queue `rows`, wait for their batch, and return their output rows in order.

        `deadline` is on the batcher's clock (time.monotonic by default). Requests with more rows
        than max_batch_size are split into several queue items; with `timings`, a BatchTiming per
        item is appended to it.
        """
        if self._closing:
            raise Unavailable("this model version is shutting down; retry")
        self.start()
        size = self.max_batch_size
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        # An empty queue always admits, so a request split into more chunks than the bound still runs.
        if self._queue and len(self._queue) + len(chunks) > self.max_queue_size:
            self._stats.shed()
            raise ResourceExhausted(
                f"server overloaded: {len(self._queue)} requests already queued (--max-queue-size "
                f"{self.max_queue_size}); retry with backoff"
            )
        loop = asyncio.get_running_loop()
        now = self._clock()
        futures = []
        for chunk in chunks:
            fut = loop.create_future()
            timing = None
            if timings is not None:
                timing = BatchTiming(now)
                timings.append(timing)
            self._queue.append(_Item(chunk, fut, deadline, now, timing))
            self._queued_rows += len(chunk)
            futures.append(fut)
        self._stats.queue_depth(len(self._queue))
        self._wakeup.set()
        try:
            if len(futures) == 1:
                return await futures[0]
            results = await asyncio.gather(*futures)
            return [row for part in results for row in part]
        finally:
            for fut in futures:
                if not fut.done():
                    fut.cancel()

    async def close(self, drain: bool = True) -> None:
        """Refuse new work; with `drain`, finish what is queued first, else fail it with UNAVAILABLE."""
        self._closing = True
        if not drain:
            self._fail_queued(Unavailable("server is shutting down; retry"))
        self._wakeup.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False)

    # -- internals ------------------------------------------------------------------------------

    def _fail_queued(self, exc: Exception) -> None:
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(exc)
        self._queued_rows = 0
        self._stats.queue_depth(0)

    def _padded_size(self, rows: int) -> int:
        if not self._allowed:
            return rows
        return self._allowed[bisect.bisect_left(self._allowed, rows)]

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except Exception:
                # A bug here must not leave callers waiting forever: fail what is queued, keep going.
                log.exception("%s: forming a batch failed", self.name)
                self._slots.release()
                self._fail_queued(RuntimeError("the batcher failed to form a batch"))
                continue
            if batch is None:
                self._slots.release()
                return
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _next_batch(self) -> list[_Item] | None:
        while True:
            while not self._queue:
                if self._closing:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
            # A free slot waits for the batch to fill, at most batch_timeout_s after the first item
            # was queued; under load the queue filled while the slot was busy and this is a no-op.
            while self._queue and self._queued_rows < self.max_batch_size and not self._closing:
                remaining = self._queue[0].enqueued + self.batch_timeout_s - self._clock()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    break
            batch = self._take()
            if batch:
                return batch

    def _take(self) -> list[_Item]:
        now = self._clock()
        batch: list[_Item] = []
        rows = expired = cancelled = 0
        while self._queue:
            item = self._queue[0]
            late = item.deadline is not None and now >= item.deadline
            if item.future.done() or late:
                self._queue.popleft()
                self._queued_rows -= len(item.rows)
                if late:
                    expired += 1
                    if not item.future.done():
                        item.future.set_exception(
                            DeadlineExceeded("the deadline passed while the request was queued")
                        )
                else:
                    cancelled += 1
                continue
            if rows + len(item.rows) > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= len(item.rows)
            batch.append(item)
            rows += len(item.rows)
        if expired:
            self._stats.expired(expired)
        if cancelled:
            self._stats.cancelled(cancelled)
        self._stats.queue_depth(len(self._queue))
        return batch

    def _compute(self, rows: list[np.ndarray], size: int) -> Sequence:
        first = rows[0]
        if size == 1 and isinstance(first, np.ndarray):
            return self._infer(first[None])  # a view: no copy for the lone request of a quiet server
        stacked = np.zeros((size, *first.shape), dtype=first.dtype)
        for i, row in enumerate(rows):
            stacked[i] = row
        return self._infer(stacked)

    async def _execute(self, batch: list[_Item]) -> None:
        try:
            rows = [row for item in batch for row in item.rows]
            size = self._padded_size(len(rows))
            start = self._clock()
            waits = [start - item.enqueued for item in batch]
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._compute, rows, size
            )
            compute_s = self._clock() - start
            if len(outputs) != size:
                raise RuntimeError(f"the model returned {len(outputs)} rows for a batch of {size}")
            self._stats.batch(len(rows), size - len(rows), waits, compute_s)
            offset = 0
            for item in batch:
                if item.timing is not None:
                    item.timing.started, item.timing.finished = start, start + compute_s
                    item.timing.batch_images = len(rows)
                n = len(item.rows)
                if not item.future.done():
                    item.future.set_result(outputs[offset : offset + n])
                offset += n
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(Unavailable("server is shutting down; retry"))
            raise
        except Exception as exc:
            log.debug("batch of %d requests failed: %r", len(batch), exc)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            self._slots.release()
