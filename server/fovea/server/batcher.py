"""Dynamic batching in plain asyncio: requests queue, batches form, a worker thread computes them.

No grpc and no TensorFlow here: `infer` is any function from a stacked batch to one output row per
input row, so tests drive this with a fake model in milliseconds. The rules follow Ray Serve's
batcher: time is measured with a monotonic clock from the first queued item; cancelled futures are
dropped before a batch runs; a result is set only `if not fut.done()`; the number of results is
checked against the batch.

The queue is bounded in count (max_queue_size) and in batches: `admit` decides before the caller
spends anything decoding (Triton's queue policy). A request that arrives at an idle batcher is always
admitted, whatever its size; otherwise it is refused when its expected finish would pass its deadline,
or when the work ahead of it exceeds max_queue_batches full batches and arrivals do not follow
answers (an open loop: a closed loop bounds itself by its number of callers, so shedding it only
makes them retry). Every bound is in the model's learned seconds (batch_costs), so the same settings
hold on a CPU and on a GPU a hundred times faster. Admitted rows count as ahead of later requests
while they are still being decoded. At most max_in_flight batches compute at once; when all slots
are busy and a full batch is queued, it is formed ahead and handed to the executor, where it starts
in the worker thread the moment a slot frees, without waiting for the event loop.

How a batch forms (the default, `formation="adaptive"`): a batch starts as soon as a compute slot is
free, except right after a batch finished, when it may wait for the callers it just answered if they
come back (batch_formation.ReturnWatch tells a closed loop from an open one, and how soon callers
return), and for rows admitted and still being decoded, until their expected decode end. Either wait
ends as soon as the rows are queued and is never longer than the break-even wait of
`ComputeCosts.worth_waiting`: the bigger batch must pay for the idle time in throughput. A lone
caller (concurrency 1) is never held. `formation="eager"` is Triton's max_queue_delay 0: start
whatever is queued at once. A positive `batch_timeout_s` replaces both with the classic rule: wait
for a full batch at most that long after the first queued item.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from fovea.server.batch_costs import ComputeCosts, Ewma
from fovea.server.batch_formation import ReturnWatch
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


class Place:
    """Rows admitted to a batcher and not yet queued (being decoded); released once, when queued.

    `ready_at` is when their decoding is expected to end (batcher clock), for the batch that may
    wait for them."""

    def __init__(self, batcher: Batcher, rows: int, chunks: int, ready_at: float) -> None:
        self._batcher: Batcher | None = batcher
        self.rows, self.chunks, self.ready_at = rows, chunks, ready_at

    def release(self) -> None:
        if self._batcher is not None:
            self._batcher._admitted_rows -= self.rows
            self._batcher._admitted_chunks -= self.chunks
            self._batcher._places.discard(self)
            self._batcher = None


# A batch with nothing queued behind it and no other batch running computes on the event loop itself
# while its learned time is below this many hops to a worker thread and back (a submit, a self-pipe
# write, two context switches; learned from the batches that took it): the hop would then cost more
# than a tenth of the call. A ratio, so it holds at any speed: a tiny model's 0.3-1.4 ms call on a
# loaded CPU stays on the loop, a 200 ms ResNet50 batch goes to the worker.
INLINE_HOPS = 10
# The work ahead of a request, in full batches, beyond which an open loop is shed (TF Serving's
# max_enqueued_batches). Two keep the model busy (one running, one formed ahead); more is latency.
MAX_QUEUE_BATCHES = 3
FORMATIONS = ("adaptive", "eager")


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
        inline_below_s: float | None = None,  # a fixed bound instead of INLINE_HOPS (0: never)
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
        self.max_queue_size = max_queue_size
        self.max_queue_wait_s = max_queue_wait_s
        self.max_queue_batches = max_queue_batches
        if formation not in FORMATIONS:
            raise ValueError(f"formation must be one of {FORMATIONS}")
        self.formation = formation
        self.inline_below_s = inline_below_s
        self.inline_batches = 0  # batches computed on the event loop (tests read it)
        self._hop = Ewma()  # seconds of the hand-over to a worker thread and back, beyond the compute
        self._stats = stats or BatcherStats()
        self._clock = clock
        self.name = name
        self._queue: collections.deque[_Item] = collections.deque()
        # Low-priority items (shadow runs): computed only while no live row is queued, dropped when
        # one is; they count in no admission bound and no batch-formation rule.
        self._low: collections.deque[_Item] = collections.deque()
        self._queued_rows = 0
        self._admitted_rows = 0  # admitted by `admit`, not yet submitted (being decoded)
        self._admitted_chunks = 0
        self._places: set[Place] = set()  # their places, each with its expected decode end
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
        self._costs = ComputeCosts(max_batch_size, self._padded_size)
        self._watch = ReturnWatch()
        # The last finished batch: when, how many rows it answered, and what was queued then.
        self._done_at: float | None = None
        self._answered = 0
        self._queued_at_done = 0
        self.formation_waits = 0  # batches that waited for callers or decodes (tests read it)

    # -- public ---------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def batches_in_flight(self) -> int:
        """Batches handed to the model and not finished: computing, or formed ahead of a free slot."""
        return len(self._in_flight)

    def expected_wait(self, rows: int = 0) -> float:
        """Seconds a request of `rows` rows arriving now would wait before its compute ends (estimate).

        The batches handed to the model cost what remains of their learned compute time (all of it
        for one formed ahead, not started); the rows queued, admitted and still being decoded, and
        the request's own, cost full batches and then the rest, at the times learned per size; slots
        compute in parallel. Counting a running batch in full would overstate the wait by half a
        batch on average: under overload the queue then never held a full batch, batches stayed
        at about half the maximum, and goodput fell to 55-60% of capacity.
        """
        if not self._costs:
            return 0.0  # nothing measured yet: warm-up already ran every batch size, so admit
        now = self._clock()
        seconds = 0.0
        for batch in self._in_flight:
            expected = self._costs(batch.size)
            seconds += expected if batch.started is None else max(0.0, expected - (now - batch.started))
        seconds += self._costs.rows_seconds(self._queued_rows + self._admitted_rows + rows)
        return seconds / self.max_in_flight

    def queue_batches(self) -> float:
        """The work ahead of a new request per compute slot, in batches: those handed to the model
        (computing or formed ahead) and the rows queued or being decoded, in full batches."""
        rows = self._queued_rows + self._admitted_rows
        return (len(self._in_flight) + rows / self.max_batch_size) / self.max_in_flight

    @contextlib.contextmanager
    def admit(self, rows: int, deadline: float | None = None, before: float = 0.0) -> Iterator[Place]:
        """Hold a place for `rows` rows that are about to be prepared and submitted, or shed at once.

        Raises ResourceExhausted when the queue is full in count, or (unless the batcher is idle) when
        the expected finish would pass `deadline` (on the batcher's clock), or the work ahead exceeds
        max_queue_batches full batches in an open loop, or max_queue_wait_s; Unavailable when
        closing. A request's own size never refuses it: an idle batcher admits anything that passed
        the per-request limits. Pass the place to `submit`, which hands it over to the queue.
        `before` is the caller's own expected wait ahead of the queue (decoding).
        """
        if self._closing:
            raise Unavailable("this model version is shutting down; retry")
        now = self._clock()
        self._watch.arrived(now)
        chunks = math.ceil(rows / self.max_batch_size)
        waiting = len(self._queue) + self._admitted_chunks
        if waiting and waiting + chunks > self.max_queue_size:
            self._shed(
                f"{waiting} requests already queued (--max-queue-size {self.max_queue_size}); "
                "retry with backoff"
            )
        if (waiting or self._in_flight) and self._costs:
            self._check_wait(rows, now, deadline, before)
        place = Place(self, rows, chunks, now + before)
        self._admitted_rows += rows
        self._admitted_chunks += chunks
        self._places.add(place)
        try:
            yield place
        finally:
            place.release()

    def _check_wait(self, rows: int, now: float, deadline: float | None, before: float) -> None:
        """The time bounds of `admit`, for a batcher with work ahead of the request."""
        ahead = self.expected_wait()
        if deadline is not None:
            finish = before + self.expected_wait(rows)
            if now + finish > deadline:
                self._shed(
                    f"it would finish in about {finish:.3g} s, past the request's deadline; retry with a "
                    "longer deadline or on another replica"
                )
        if self.max_queue_batches > 0 and not self._watch.closed_loop:
            # Counted in batches, not in learned seconds: the costs of different sizes are learned
            # at different moments (a small batch timed while a reload took the CPU, the full one at
            # warm-up), and their ratio is no measure of the queue.
            batches = self.queue_batches()
            if batches > self.max_queue_batches:
                self._shed(
                    f"{batches:.1f} batches of work are ahead of it (--max-queue-batches "
                    f"{self.max_queue_batches:g}); retry with backoff or on another replica"
                )
        if self.max_queue_wait_s > 0 and ahead > self.max_queue_wait_s:
            self._shed(
                f"the expected wait is {ahead:.2f} s, above the {self.max_queue_wait_s:g} s limit "
                "(--max-queue-wait-ms); retry with backoff or on another replica"
            )

    def _shed(self, why: str) -> None:
        self._stats.shed()
        raise ResourceExhausted(f"server overloaded: {why}")

    def poke(self) -> None:
        """Re-read the clock now: a waiting batch runs if its timeout passed (tests with a fake clock)."""
        self._wakeup.set()

    def seed_costs(self, seconds_by_size: dict[int, float]) -> None:
        """Start the learned compute times from measurements made elsewhere (the version's warm-up
        runs every batch size once), so admission and batch formation know the model's costs from
        the first request on."""
        for size, seconds in seconds_by_size.items():
            self._costs.learn(self._padded_size(size), seconds)

    def expected_compute_s(self, size: int) -> float:
        """Learned seconds the model takes for a batch of `size` rows (after padding); 0.0 until a
        batch has run (see ComputeCosts)."""
        return self._costs(size)

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def submit(
        self,
        rows: Sequence[np.ndarray],
        deadline: float | None = None,
        timings: list | None = None,
        place: Place | None = None,
        low_priority: bool = False,
        yield_to: Callable[[], bool] | None = None,
    ) -> list:
        """Queue `rows`, wait for their batch, and return their output rows in order.

        `low_priority` work (a shadow run) waits behind every live row: it raises LowPriorityDropped
        at once if live work is queued or being decoded, and later if live work arrives before it
        started. At most one batch of it computes while live work waits. `yield_to` (a live
        version's `busy`) makes it give way to that work too.

        With the `place` that `admit` gave, the rows take it over (the count bound was checked then).

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
            place.release()  # the bound was checked by `admit`; the rows now count as queued
        # An empty queue always admits, so a request split into more chunks than the bound still runs.
        elif self._queue and len(self._queue) + len(chunks) > self.max_queue_size:
            self._shed(
                f"{len(self._queue)} requests already queued (--max-queue-size {self.max_queue_size}); "
                "retry with backoff"
            )
        else:
            self._watch.arrived(self._clock())  # not admitted first: it arrives now
        loop = asyncio.get_running_loop()
        now = self._clock()
        futures = []
        for chunk in chunks:
            fut = loop.create_future()
            timing = None
            if timings is not None:
                timing = BatchTiming(now)
                timings.append(timing)
            item = _Item(chunk, fut, deadline, now, timing)
            if len(chunks) == 1 and self._runs_now(len(chunk)):
                return await self._run_now(item)
            self._queue.append(item)
            self._queued_rows += len(chunk)
            futures.append(fut)
        self._stats.queue_depth(len(self._queue))
        self._wakeup.set()
        return await _rows_of(futures)

    @property
    def busy(self) -> bool:
        """Work is queued, being decoded or computing."""
        return bool(self._queue or self._admitted_rows or self._in_flight)

    async def _submit_low(
        self, chunks: list[Sequence[np.ndarray]], deadline: float | None, yield_to: Callable[[], bool] | None
    ) -> list:
        if self._queue or self._admitted_rows or (yield_to is not None and yield_to()):
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
                # The classic rule: wait for a full batch, at most batch_timeout_s after the first
                # item was queued; under load the queue filled while the slot was busy: a no-op.
                target, deadline = self.max_batch_size, self._queue[0].enqueued + self.batch_timeout_s
            else:
                target, deadline = self._target()
            waited = False
            while self._queue and self._queued_rows < target and not self._closing:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                waited = True
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    break
            self.formation_waits += waited
            batch = self._take()
            if batch:
                self._done_at = None  # the finished batch's callers have had their chance
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
        return len(self._in_flight) < self.max_in_flight or self._queued_rows >= self.max_batch_size

    def _target(self) -> tuple[int, float]:
        """Rows worth waiting for, and until when (see the module docstring)."""
        if self._done_at is None or self.formation == "eager":
            return 0, float("-inf")
        return max(self._returns_target(), self._decoding_target())

    def _returns_target(self) -> tuple[int, float]:
        """The callers the last batch answered, if they come back (a closed loop) and it pays."""
        target = min(self.max_batch_size, self._queued_at_done + self._answered)
        queued = self._queued_rows
        if target <= max(queued, 1):
            return 0, float("-inf")
        now = self._clock()
        until = min(self._watch.window(), now + self._costs.worth_waiting(queued, target))
        expected = self._watch.delay.value
        if until <= now or (expected is not None and until < self._done_at + expected):
            return 0, float("-inf")  # they would come back too late to pay for the wait
        return target, until

    def _decoding_target(self) -> tuple[int, float]:
        """Rows admitted and still being decoded: worth waiting for until their expected decode end,
        if the bigger batch pays. While they decode, a small batch computing beside them would also
        take the CPU their decoding needs."""
        if not self._admitted_rows:
            return 0, float("-inf")
        queued = self._queued_rows
        target = min(self.max_batch_size, queued + self._admitted_rows)
        if target <= max(queued, 1):
            return 0, float("-inf")
        now = self._clock()
        worth = self._costs.worth_waiting(queued, target)
        ready = max(place.ready_at for place in self._places) - now
        if ready > worth:
            return 0, float("-inf")
        # An overdue or unknown decode end: they are expected any moment, within the break-even wait.
        return target, now + (worth if ready <= 0 else min(worth, 2 * ready))

    def _finished(self, requests: int, rows: int, size: int, compute_s: float) -> None:
        """Learn from a finished batch; its callers may come back (see `_returns_target`)."""
        self._costs.learn(size, compute_s)
        if not requests:
            return  # low-priority work only: no caller comes back for it
        now = self._clock()
        self._watch.answered(now, requests)
        self._done_at = now
        self._answered = rows
        self._queued_at_done = self._queued_rows

    def _low_may_run(self) -> bool:
        """Low-priority work runs only on a free compute slot with no live row queued or decoding."""
        return bool(self._low) and not self._admitted_rows and len(self._in_flight) < self.max_in_flight

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
                self._queued_rows -= len(item.rows)
                dropped.append(item)
                continue
            if rows + len(item.rows) > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= len(item.rows)
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
        known = self._costs.known(size)
        bound = self.inline_below_s
        if bound is None:
            bound = INLINE_HOPS * (self._hop.value or 0.0)
        return known is not None and known < bound

    def _runs_now(self, rows: int) -> bool:
        """Whether a request may compute in its caller's task: nothing else queued, decoding or
        computing, a known-tiny batch (`_inline`), and no formation rule that would wait for more."""
        return (
            not (self._low or self._admitted_rows or self._slots.locked())
            and self.batch_timeout_s <= 0
            and (
                self._done_at is None
                or self.formation == "eager"
                or self._queued_at_done + self._answered <= rows
            )
            and self._inline(self._padded_size(rows))
        )

    async def _run_now(self, item: _Item) -> list:
        """Compute a lone request as `_run` would inline, in the caller's task: no hand-over to `_run`
        and back (two event-loop turns, 0.1-0.2 ms of a tiny model's call: bench/NOTES.md). Never
        yields."""
        await self._slots.acquire()  # free (see `_runs_now`): returns at once
        record = _InFlight(self._padded_size(len(item.rows)))
        self._in_flight.append(record)
        self._done_at = None  # as `_next_batch` does with a batch it takes
        await self._execute([item], record, inline=True)
        return item.future.result()

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
                    sent, alone = self._clock(), len(self._in_flight) == 1  # alone: it waits for no slot
                    live, outputs, start, end = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._compute, batch, record
                    )
                    if alone and live:
                        self._hop.add(max(0.0, self._clock() - sent - (end - start)))
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
