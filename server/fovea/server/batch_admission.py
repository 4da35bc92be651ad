"""Admission to one batcher: the ticket a request holds while its rows are decoded, and the policy
that gives it or sheds the request before the caller spends anything decoding (Triton's queue policy).

The queue is bounded in count (max_queue_size) and in batches. A request that arrives at an idle
batcher is always admitted, whatever its size; otherwise it is refused when its expected finish
would pass its deadline, or when the work ahead of it exceeds max_queue_batches full batches and
arrivals do not follow answers (an open loop: a closed loop bounds itself by its number of callers,
so shedding it only makes them retry). Every bound is in the model's learned seconds (batch_costs),
so the same settings hold on a CPU and on a GPU a hundred times faster. Admitted rows count as ahead
of later requests while they are still being decoded: the ticket holds them until `submit` queues
them, and the queue counts them from then on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from fovea.server.batch_costs import ModelCosts
from fovea.server.batch_formation import ReturnWatch
from fovea.server.errors import ResourceExhausted

if TYPE_CHECKING:
    from fovea.server.batcher import BatcherStats

# The work ahead of a request, in full batches, beyond which an open loop is shed (TF Serving's
# max_enqueued_batches). Two keep the model busy (one running, one formed ahead); more is latency.
MAX_QUEUE_BATCHES = 3


class Queued(Protocol):
    """What admission reads of the batcher's queue: its items (len) and their rows."""

    rows: int

    def __len__(self) -> int: ...


class Running(Protocol):
    """A batch handed to the executor: its padded size, and when the model started on it (None
    while it waits ahead of a free slot)."""

    size: int
    started: float | None


class Ticket:
    """Rows admitted to a batcher and not yet queued (being decoded); released once: when `submit`
    queues them, or at the end of the `with` block that `admit` opened.

    `ready_at` is when their decoding is expected to end (batcher clock), for the batch that may
    wait for them."""

    __slots__ = ("_admission", "chunks", "ready_at", "rows")

    def __init__(self, admission: Admission, rows: int, chunks: int, ready_at: float) -> None:
        self._admission: Admission | None = admission
        self.rows, self.chunks, self.ready_at = rows, chunks, ready_at

    def release(self) -> None:
        if self._admission is not None:
            self._admission._release(self)
            self._admission = None

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission:
    """One batcher's admission: its tickets (rows being decoded) and the bounds that refuse a request.

    It reads the batcher's queue and its running batches (the same objects the batcher mutates) and
    the learned costs; it writes only its own counts, and tells `watch` of every arrival.
    """

    def __init__(
        self,
        *,
        queue: Queued,
        running: Sequence[Running],
        costs: ModelCosts,
        watch: ReturnWatch,
        stats: BatcherStats,
        clock: Callable[[], float],
        max_batch_size: int,
        max_in_flight: int,
        max_queue_size: int,
        max_queue_wait_s: float,
        max_queue_batches: float,
    ) -> None:
        self._queue = queue
        self._running = running
        self._costs = costs
        self._watch = watch
        self._stats = stats
        self._clock = clock
        self.max_batch_size = max_batch_size
        self.max_in_flight = max_in_flight
        self.max_queue_size = max_queue_size
        self.max_queue_wait_s = max_queue_wait_s
        self.max_queue_batches = max_queue_batches
        self.admitted_rows = 0  # held by tickets: admitted, not yet queued (being decoded)
        self.admitted_chunks = 0
        self._tickets: set[Ticket] = set()  # each with its expected decode end

    def admit(self, rows: int, deadline: float | None = None, before: float = 0.0) -> Ticket:
        """A ticket for `rows` rows that are about to be prepared and submitted, or shed at once.

        Raises ResourceExhausted when the queue is full in count, or (unless the batcher is idle) when
        the expected finish would pass `deadline` (on the batcher's clock), or the work ahead exceeds
        max_queue_batches full batches in an open loop, or max_queue_wait_s. A request's own size never
        refuses it: an idle batcher admits anything that passed the per-request limits. `before` is
        the caller's own expected wait ahead of the queue (decoding).
        """
        now = self._clock()
        self._watch.arrived(now)
        chunks = math.ceil(rows / self.max_batch_size)
        waiting = len(self._queue) + self.admitted_chunks
        if waiting and waiting + chunks > self.max_queue_size:
            self.shed(
                f"{waiting} requests already queued (--max-queue-size {self.max_queue_size}); "
                "retry with backoff"
            )
        if (waiting or self._running) and self._costs:
            self._check_wait(rows, now, deadline, before)
        ticket = Ticket(self, rows, chunks, now + before)
        self.admitted_rows += rows
        self.admitted_chunks += chunks
        self._tickets.add(ticket)
        return ticket

    def arrive(self, chunks: int) -> None:
        """A request submitted without a ticket: the count bound only, checked as it is queued."""
        # An empty queue always admits, so a request split into more chunks than the bound still runs.
        if self._queue and len(self._queue) + chunks > self.max_queue_size:
            self.shed(
                f"{len(self._queue)} requests already queued (--max-queue-size {self.max_queue_size}); "
                "retry with backoff"
            )
        self._watch.arrived(self._clock())  # not admitted first: it arrives now

    def latest_ready(self) -> float:
        """When the last of the rows being decoded is expected to be ready (batcher clock)."""
        return max(ticket.ready_at for ticket in self._tickets)

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
        for batch in self._running:
            expected = self._costs(batch.size)
            seconds += expected if batch.started is None else max(0.0, expected - (now - batch.started))
        seconds += self._costs.rows_seconds(self._queue.rows + self.admitted_rows + rows)
        return seconds / self.max_in_flight

    def queue_batches(self) -> float:
        """The work ahead of a new request per compute slot, in batches: those handed to the model
        (computing or formed ahead) and the rows queued or being decoded, in full batches."""
        rows = self._queue.rows + self.admitted_rows
        return (len(self._running) + rows / self.max_batch_size) / self.max_in_flight

    def shed(self, why: str) -> None:
        self._stats.shed()
        raise ResourceExhausted(f"server overloaded: {why}")

    def _check_wait(self, rows: int, now: float, deadline: float | None, before: float) -> None:
        """The time bounds of `admit`, for a batcher with work ahead of the request."""
        ahead = self.expected_wait()
        if deadline is not None:
            finish = before + self.expected_wait(rows)
            if now + finish > deadline:
                self.shed(
                    f"it would finish in about {finish:.3g} s, past the request's deadline; retry with a "
                    "longer deadline or on another replica"
                )
        if self.max_queue_batches > 0 and not self._watch.closed_loop:
            # Counted in batches, not in learned seconds: the costs of different sizes are learned
            # at different moments (a small batch timed while a reload took the CPU, the full one at
            # warm-up), and their ratio is no measure of the queue.
            batches = self.queue_batches()
            if batches > self.max_queue_batches:
                self.shed(
                    f"{batches:.1f} batches of work are ahead of it (--max-queue-batches "
                    f"{self.max_queue_batches:g}); retry with backoff or on another replica"
                )
        if self.max_queue_wait_s > 0 and ahead > self.max_queue_wait_s:
            self.shed(
                f"the expected wait is {ahead:.2f} s, above the {self.max_queue_wait_s:g} s limit "
                "(--max-queue-wait-ms); retry with backoff or on another replica"
            )

    def _release(self, ticket: Ticket) -> None:
        self.admitted_rows -= ticket.rows
        self.admitted_chunks -= ticket.chunks
        self._tickets.discard(ticket)
