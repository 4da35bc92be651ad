"""Dynamic batching in plain asyncio: requests queue, batches form, a worker thread computes them.

No grpc and no TensorFlow here: `infer` is any function from a stacked batch to one output row per
input row, so tests drive this with a fake model in milliseconds. The rules follow Ray Serve's
batcher: time is measured with a monotonic clock from the first queued item; cancelled futures are
dropped before a batch runs; a result is set only `if not fut.done()`; the number of results is
checked against the batch.

The batcher holds the queue, the compute slots and where a batch runs; each of its other ideas has a
module of its own, which it owns one instance of:
- batch_admission: `admit` decides before the caller spends anything decoding (Triton's queue
  policy), and the ticket it gives holds the request's rows while they are decoded;
- batch_costs: `ModelCosts`, the learned seconds every admission and formation rule is written in;
- batch_formation: how many rows a batch waits for, and until when (adaptive, eager, classic).
At most max_in_flight batches compute at once; when all slots are busy and a full batch is queued,
it is formed ahead and handed to the executor, where it starts in the worker thread the moment a
slot frees, without waiting for the event loop. A tiny batch with nothing else to do runs on the
event loop itself. Low-priority work (shadow runs) has a queue of its own and yields to live work.
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
from fovea.server import batch_formation
from fovea.server.batch_admission import MAX_QUEUE_BATCHES, Admission, Ticket
from fovea.server.batch_costs import ModelCosts
from fovea.server.batch_formation import FORMATIONS, NO_WAIT, LastBatch, ReturnWatch, Target
from fovea.server.errors import DeadlineExceeded, Unavailable

__all__ = [
    "FORMATIONS",
    "INLINE_BELOW_S",
    "MAX_QUEUE_BATCHES",
    "BatchTiming",
    "Batcher",
    "BatcherStats",
    "LowPriorityDropped",
    "Place",
    "Ticket",
    "warmup_sizes",
]

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
    low_priority: bool = False
    # Low-priority work also yields to other work this returns True for (the live version's batcher,
    # which shares the device): checked when it is submitted and when its batch would start.
    yield_to: Callable[[], bool] | None = None


class LowPriorityDropped(Unavailable):
    """Low-priority work (a shadow run) dropped because live work was queued."""


@dataclass(eq=False)
class _InFlight:
    """A batch handed to the executor: its padded size, and when the model started on it (set by
    the worker thread; None while it waits ahead of a free slot)."""

    size: int
    started: float | None = None


def _live(item: _Item, now: float) -> bool:
    """Whether a queued item still needs computing: its caller waits and its deadline is ahead.

    Also read off the loop (by `_compute`): `future.done()` is a plain attribute read there, and at
    worst a row is computed whose answer is dropped later."""
    return not item.future.done() and (item.deadline is None or now < item.deadline)


Place = Ticket  # its former name


class _Queue(collections.deque[_Item]):
    """The live queue: its items, oldest first, and the rows they hold (admission reads both)."""

    rows: int = 0


# A batch expected to compute faster than this, with nothing queued behind it and no other batch
# running, runs on the event loop itself: the hop to a worker thread and back (a submit, a self-pipe
# write, two context switches) costs about as much as a tiny model's whole call. A fixed bound, on
# purpose: a bound learned as ten measured hops (the hop timed on the batches that took it) took in
# the event loop's own delay under load, grew to about 5 ms at 64 callers, and let a 40 ms ResNet50
# batch of 1 run on the loop, which then took no request in while it computed: every batch stayed
# at 1 (interleaved run, XLA on: mean batch 1.0 at 16 and 64 callers, 18 img/s against `--no-xla`'s
# 57). Work that blocks the loop must stay far below any request's round trip; 1 ms does on any host.
INLINE_BELOW_S = 0.001


async def _rows_of(futures: list[asyncio.Future]) -> list:
    """The output rows of a request's queue items, in order; a caller that leaves cancels them all
    (so they are dropped before compute)."""
    try:
        if len(futures) == 1:
            return await futures[0]
        results = await asyncio.gather(*futures)
        return [row for part in results for row in part]
    finally:
        for fut in futures:
            if not fut.done():
                fut.cancel()


def _admission_setting(name: str) -> property:
    """A Batcher attribute that reads and writes the same-named setting of its Admission."""
    return property(
        lambda self: getattr(self._admission, name),
        lambda self, value: setattr(self._admission, name, value),
    )


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
        max_queue_wait_s: float = 0.0,
        max_queue_batches: float = MAX_QUEUE_BATCHES,
        formation: str = "adaptive",
        inline_below_s: float = INLINE_BELOW_S,  # 0: never
        executor: concurrent.futures.Executor | None = None,
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
        if formation not in FORMATIONS:
            raise ValueError(f"formation must be one of {FORMATIONS}")
        self.formation = formation
        self.inline_below_s = inline_below_s
        self._stats = stats or BatcherStats()
        self._clock = clock
        self.name = name
        self._queue = _Queue()
        # Low-priority items (shadow runs): computed only while no live row is queued, dropped when
        # one is; they count in no admission bound and no batch-formation rule.
        self._low: collections.deque[_Item] = collections.deque()
        # Batches handed to the executor and not finished (computing, or formed ahead), oldest first.
        self._in_flight: list[_InFlight] = []
        self._wakeup = asyncio.Event()
        # One batch more than max_in_flight may be formed: a full one, handed to the executor to start
        # the moment a compute slot frees (see `_may_form`).
        self._slots = asyncio.Semaphore(max_in_flight + 1)
        # Where batches compute (tests may pass one that runs them in the calling thread).
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_in_flight, thread_name_prefix=name
        )
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._loop_task: asyncio.Task | None = None
        self.costs = ModelCosts(max_batch_size, self._padded_size)
        self._watch = ReturnWatch()
        self._admission = Admission(
            queue=self._queue,
            running=self._in_flight,
            costs=self.costs,
            watch=self._watch,
            stats=self._stats,
            clock=clock,
            max_batch_size=max_batch_size,
            max_in_flight=max_in_flight,
            max_queue_size=max_queue_size,
            max_queue_wait_s=max_queue_wait_s,
            max_queue_batches=max_queue_batches,
        )
        self._last: LastBatch | None = None  # the last finished batch, until the next one forms
        # What tests read: batches computed on the event loop, and batches that waited for callers
        # or decodes.
        self.inline_batches = 0
        self.formation_waits = 0

    # -- public ---------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def batches_in_flight(self) -> int:
        """Batches handed to the model and not finished: computing, or formed ahead of a free slot."""
        return len(self._in_flight)

    # The admission bounds live in batch_admission; these forward to it (tests change them live).
    max_queue_size = _admission_setting("max_queue_size")
    max_queue_wait_s = _admission_setting("max_queue_wait_s")
    max_queue_batches = _admission_setting("max_queue_batches")

    def expected_wait(self, rows: int = 0) -> float:
        """Seconds a request of `rows` rows arriving now would wait before its compute ends (estimate;
        see `Admission.expected_wait`)."""
        return self._admission.expected_wait(rows)

    def queue_batches(self) -> float:
        """The work ahead of a new request per compute slot, in batches (see `Admission.queue_batches`)."""
        return self._admission.queue_batches()

    def admit(self, rows: int, deadline: float | None = None, before: float = 0.0) -> Ticket:
        """A ticket for `rows` rows that are about to be prepared and submitted, or shed at once
        (`Admission.admit`); use it as a context manager, and pass it to `submit`, which hands its
        rows over to the queue. Raises Unavailable when closing.
        """
        if self._closing:
            raise Unavailable("this model version is shutting down; retry")
        return self._admission.admit(rows, deadline, before)

    def poke(self) -> None:
        """Re-read the clock now: a waiting batch runs if its timeout passed (tests with a fake clock)."""
        self._wakeup.set()

    def seed_costs(self, seconds_by_size: dict[int, float]) -> None:
        """Start the learned compute times from measurements made elsewhere (the version's warm-up
        runs every batch size once), so admission and batch formation know the model's costs from
        the first request on."""
        for size, seconds in seconds_by_size.items():
            self.costs.learn(self._padded_size(size), seconds)

    def expected_compute_s(self, size: int) -> float:
        """Learned seconds the model takes for a batch of `size` rows (after padding); 0.0 until a
        batch has run (see ModelCosts)."""
        return self.costs(size)

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def submit(
        self,
        rows: Sequence[np.ndarray],
        deadline: float | None = None,
        timings: list | None = None,
        place: Ticket | None = None,
        low_priority: bool = False,
        yield_to: Callable[[], bool] | None = None,
    ) -> list:
        """Queue `rows`, wait for their batch, and return their output rows in order.

        `low_priority` work (a shadow run) waits behind every live row: it raises LowPriorityDropped
        at once if live work is queued or being decoded, and later if live work arrives before it
        started. At most one batch of it computes while live work waits. `yield_to` (a live
        version's `busy`) makes it give way to that work too.

        With the ticket that `admit` gave (`place`), the queue takes its rows over (the bounds were
        checked then).

        `deadline` is on the batcher's clock (time.monotonic by default). Requests with more rows
        than max_batch_size are split into several queue items; with `timings`, a BatchTiming per
        item is appended to it.
        """
        if self._closing:
            raise Unavailable("this model version is shutting down; retry")
        self.start()
        size = self.max_batch_size
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        if low_priority:
            return await self._submit_low(chunks, deadline, yield_to)
        if place is not None:
            place.release()  # the bounds were checked by `admit`; the rows now count as queued
        else:
            self._admission.arrive(len(chunks))
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
            self._queue.rows += len(chunk)
            futures.append(fut)
        self._stats.queue_depth(len(self._queue))
        self._wakeup.set()
        return await _rows_of(futures)

    @property
    def busy(self) -> bool:
        """Work is queued, being decoded or computing."""
        return bool(self._queue or self._admission.admitted_rows or self._in_flight)

    async def _submit_low(
        self, chunks: list[Sequence[np.ndarray]], deadline: float | None, yield_to: Callable[[], bool] | None
    ) -> list:
        if self._queue or self._admission.admitted_rows or (yield_to is not None and yield_to()):
            raise LowPriorityDropped("live work is queued")
        loop = asyncio.get_running_loop()
        now = self._clock()
        futures = []
        for chunk in chunks:
            fut = loop.create_future()
            self._low.append(_Item(chunk, fut, deadline, now, low_priority=True, yield_to=yield_to))
            futures.append(fut)
        self._wakeup.set()
        return await _rows_of(futures)

    def _drop_low(self) -> None:
        while self._low:
            item = self._low.popleft()
            if not item.future.done():
                item.future.set_exception(LowPriorityDropped("live work arrived"))

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
        self._drop_low()
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(exc)
        self._queue.rows = 0
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
            size = self._padded_size(sum(len(item.rows) for item in batch))
            inline = self._inline(size)
            # Counted now, not when its task first runs: `_may_form` reads it for the next batch.
            record = _InFlight(size)
            self._in_flight.append(record)
            if inline:
                # Computed on the loop anyway: run it here rather than in a task of its own, which
                # saves the event-loop turn that would start that task.
                await self._execute(batch, record, inline=True)
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch, record, inline=False))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _next_batch(self) -> list[_Item] | None:
        while True:
            while not (self._queue and self._may_form()) and not self._low_may_run():
                if self._closing and not self._queue and not self._low:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
            if not self._queue:
                batch = self._take_low()
                if batch:
                    return batch
                continue
            if self.batch_timeout_s > 0:
                target, deadline = batch_formation.classic_target(
                    self._queue[0].enqueued, self.batch_timeout_s, self.max_batch_size
                )
            else:
                target, deadline = self._target()
            waited = False
            while self._queue and self._queue.rows < target and not self._closing:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                waited = True
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    break
                if self.batch_timeout_s <= 0:
                    # Each arrival shortens the wait still worth it: the break-even of the rows now
                    # queued (the wait already spent is sunk). The last of 16 is worth far less
                    # waiting than the second.
                    target, deadline = self._target()
            self.formation_waits += waited
            batch = self._take()
            if batch:
                self._last = None  # the finished batch's callers have had their chance
                return batch

    def _may_form(self) -> bool:
        """A batch forms when a compute slot is free, or ahead of one when a full batch is queued.

        A full batch cannot grow by waiting, so it goes to the executor at once and starts in the
        worker thread as soon as the running batch ends. Otherwise the next batch would start only
        after the event loop has seen the last one finish and formed this one: under overload the
        loop is busy answering and refusing requests, and the model sat idle for that long (at 4x
        capacity it ran at three quarters of its speed). Rows ahead can no longer expire or be
        dropped when their callers leave; they wait one batch at most.
        """
        return len(self._in_flight) < self.max_in_flight or self._queue.rows >= self.max_batch_size

    def _target(self) -> Target:
        """Rows worth waiting for, and until when (batch_formation)."""
        if self._last is None or self.formation == "eager":
            return NO_WAIT
        admission = self._admission
        return batch_formation.adaptive_target(
            self._clock(),
            self._last,
            self._queue.rows,
            admission.admitted_rows,
            admission.latest_ready,
            self._watch,
            self.costs,
            self.max_batch_size,
        )

    def _finished(self, requests: int, rows: int, size: int, compute_s: float) -> None:
        """Learn from a finished batch; its callers may come back (see `returns_target`)."""
        self.costs.learn(size, compute_s)
        if not requests:
            return  # low-priority work only: no caller comes back for it
        now = self._clock()
        self._watch.answered(now, requests)
        self._last = LastBatch(now, rows, self._queue.rows)

    def _low_may_run(self) -> bool:
        """Low-priority work runs only on a free compute slot with no live row queued or decoding."""
        return (
            bool(self._low)
            and not self._admission.admitted_rows
            and len(self._in_flight) < self.max_in_flight
        )

    def _take_low(self) -> list[_Item]:
        batch: list[_Item] = []
        rows = 0
        while self._low and rows + len(self._low[0].rows) <= self.max_batch_size:
            item = self._low.popleft()
            if item.future.done():
                continue
            if item.yield_to is not None and item.yield_to():
                item.future.set_exception(LowPriorityDropped("live work is queued or computing"))
                continue
            batch.append(item)
            rows += len(item.rows)
        return batch

    def _take(self) -> list[_Item]:
        self._drop_low()  # live work is queued: low-priority work never goes ahead of it
        now = self._clock()
        batch: list[_Item] = []
        dropped: list[_Item] = []
        rows = 0
        while self._queue:
            item = self._queue[0]
            if not _live(item, now):
                self._queue.popleft()
                self._queue.rows -= len(item.rows)
                dropped.append(item)
                continue
            if rows + len(item.rows) > self.max_batch_size:
                break
            self._queue.popleft()
            self._queue.rows -= len(item.rows)
            batch.append(item)
            rows += len(item.rows)
        self._drop(dropped, now)
        self._stats.queue_depth(len(self._queue))
        return batch

    def _drop(self, items: list[_Item], now: float) -> None:
        """Answer and count items left out of a batch at `now`: expired (their deadline passed, even
        if their caller has left meanwhile), or cancelled (their caller left)."""
        expired = cancelled = 0
        for item in items:
            if item.deadline is not None and now >= item.deadline:
                expired += 1
                if not item.future.done():
                    item.future.set_exception(
                        DeadlineExceeded("the deadline passed while the request was queued")
                    )
            else:
                cancelled += 1
        if expired:
            self._stats.expired(expired)
        if cancelled:
            self._stats.cancelled(cancelled)

    def _inline(self, size: int) -> bool:
        """Whether to compute on the loop: a known-tiny batch with nothing else to do meanwhile."""
        if self._in_flight or self._queue:
            return False
        known = self.costs.known(size)
        return known is not None and known < self.inline_below_s

    def _compute(self, batch: list[_Item], record: _InFlight) -> tuple[list[_Item], Sequence, float, float]:
        """Run the model on the batch's live items; return them, the output rows, and when the
        model started and ended, timed where it runs (a batch formed ahead waits in the executor
        first, and the loop may see the end late).

        Items whose deadline passed or whose caller left meanwhile are left out (a batch formed ahead
        may wait a whole batch).
        """
        start = record.started = self._clock()
        live = [item for item in batch if _live(item, start)]
        if not live:
            return live, [], start, start
        rows = [row for item in live for row in item.rows]
        size = self._padded_size(len(rows))
        first = rows[0]
        if size == 1 and isinstance(first, np.ndarray):
            # A view: no copy for the lone request of a quiet server.
            return live, self._infer(first[None]), start, self._clock()
        stacked = np.zeros((size, *first.shape), dtype=first.dtype)
        for i, row in enumerate(rows):
            stacked[i] = row
        return live, self._infer(stacked), start, self._clock()

    async def _execute(self, batch: list[_Item], record: _InFlight, inline: bool) -> None:
        """Compute a batch that `_run` counted in `_in_flight`, and answer it."""
        try:
            try:
                if inline:
                    self.inline_batches += 1
                    live, outputs, start, end = self._compute(batch, record)
                else:
                    live, outputs, start, end = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._compute, batch, record
                    )
            finally:
                self._in_flight.remove(record)
                self._wakeup.set()  # a slot is free: a batch may form
            if len(live) < len(batch):
                kept = {id(item) for item in live}
                self._drop([item for item in batch if id(item) not in kept], start)
            if not live:
                return
            rows = sum(len(item.rows) for item in live)
            size = self._padded_size(rows)
            compute_s = end - start
            if len(outputs) != size:
                raise RuntimeError(f"the model returned {len(outputs)} rows for a batch of {size}")
            self._stats.batch(rows, size - rows, [start - item.enqueued for item in live], compute_s)
            self._finished(sum(not item.low_priority for item in live), rows, size, compute_s)
            offset = 0
            for item in live:
                if item.timing is not None:
                    item.timing.started, item.timing.finished = start, end
                    item.timing.batch_images = rows
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
