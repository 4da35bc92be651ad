"""How a batch forms: how many rows are worth waiting for, and until when; the rules and what they read.

The default, `formation="adaptive"`: a batch starts as soon as a compute slot is free, except right
after a batch finished, when it may wait for the callers it just answered if they come back
(`returns_target`; `ReturnWatch` tells a closed loop from an open one),
and for rows admitted and still being decoded, until their expected decode end (`decoding_target`).
Either wait ends as soon as the rows are queued and is never longer than the break-even wait of
`ModelCosts.worth_waiting` for the rows queued at the moment: the bigger batch must pay for the idle
time in throughput, and the wait already spent is sunk. A lone caller
(concurrency 1) is never held. `formation="eager"` is Triton's max_queue_delay 0: start whatever is
queued at once. A positive batch timeout replaces both with the classic rule (`classic_target`):
wait for a full batch at most that long after the first queued item. Each rule is a function of the
state it reads; the batcher owns that state and does the waiting.

Whether callers come back after their answer, and how soon, decides the adaptive wait.

In a closed loop (each caller sends its next request once answered) the callers a batch answered
return within a round trip, and starting the next batch without them splits the load into
alternating small batches (1/3 at 4 callers, 8/8 at 16) that run below the model's speed. In an open
loop (arrivals that do not follow answers) waiting only adds latency: Triton's rule, start whatever
is queued at once, is the right one there.

`ReturnWatch` tells them apart by what happens after the callers come back. After each batch it
counts the requests that arrive until as many arrived as the batch answered (taking time X), and
then the requests that arrive in the next X (requests, not rows: a caller sends one request after
its answer, whatever its size). A closed loop's arrivals stop once its callers are back (they
all wait for answers again): that second count is near 0. Arrivals that do not follow answers
keep coming at their rate: the second count is about as large as the first. The ratio of the two
is a property of the traffic, not of its speed, so the rule holds at any model speed and any round
trip. How long a batch waits for the returns is the break-even wait (`ModelCosts.worth_waiting`,
which the batcher recomputes as each row arrives), not a multiple of the returns' learned delay:
returns have a long tail (traced on this host at 4 callers: 5 ms, and now and then 12-21 ms), and a
wait cut at twice the typical delay started batches without the straggler, which then waited a
whole batch while the others waited for it (1/3 alternation). The learned delay only says when
returns come too late to pay at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fovea.server.batch_costs import Ewma, ModelCosts

FORMATIONS = ("adaptive", "eager")

# Requests arriving after the returns, per request answered, below which the traffic is a closed loop.
# A closed loop gives 0 (0.1 at most, when a caller comes back late); a Poisson stream gives about 1
# per observation, and its average over the last ten or so, the ratio, stays above 0.35 (measured by
# bench/batcher_sim.py over five cost curves and loads from 50% to 400%). A statistical boundary
# between the two distributions, not a speed.
CLOSED_LOOP_RATIO = 0.2
# Weight of one observation in the ratio: slower than the cost averages, since a single batch's
# count is noisy (a Poisson count of mean 1 is 0 a third of the time).
_RATIO_WEIGHT = 0.1


class ReturnWatch:
    """Learns, from arrivals and finished batches, whether answered callers return, and how soon."""

    def __init__(self) -> None:
        # Ratio of two averages (requests after the returns / requests answered); it starts by assuming a
        # closed loop, which costs an open one a few short waits while it learns.
        self._after_mean = Ewma(_RATIO_WEIGHT, 0.0)
        self._answered = Ewma(_RATIO_WEIGHT, 1.0)
        self.delay = Ewma()  # seconds from a batch's end until as many requests arrived as it answered
        self._last_end: float | None = None
        self._start = 0.0  # the open observation: the batch's end,
        self._need = 0  # the requests it answered (0: none open),
        self._seen = 0  # requests arrived since,
        self._returned_at: float | None = None  # when they were all back,
        self._after = 0  # and requests arrived after that, until twice that time.

    @property
    def ratio(self) -> float:
        return (self._after_mean.value or 0.0) / max(self._answered.value or 1.0, 1e-9)

    @property
    def closed_loop(self) -> bool:
        return self.ratio < CLOSED_LOOP_RATIO

    def arrived(self, now: float, requests: int = 1) -> None:
        if not self._need:
            return
        if self._returned_at is None:
            self._seen += requests
            if self._seen >= self._need:
                self._returned_at = now
                self.delay.add(now - self._start)
        elif now - self._returned_at <= self._returned_at - self._start:
            self._after += requests
        else:
            self._close(self._after)

    def answered(self, now: float, requests: int) -> None:
        """A batch of `requests` requests finished at `now`: close the last observation, open one."""
        if self._need:
            # Not all of the last batch's callers came back before this batch ended: arrivals do not
            # follow answers. All back, and the second window still open: count what it saw.
            self._close(self._need if self._returned_at is None else self._after)
        self._last_end = now
        self._start, self._need, self._seen = now, requests, 0
        self._returned_at, self._after = None, 0

    @property
    def returns_expected(self) -> bool:
        """Whether the callers the last batch answered are expected back (a closed loop)."""
        return self.closed_loop and self._last_end is not None

    def _close(self, after: int) -> None:
        self._after_mean.add(after)
        self._answered.add(self._need)
        self._need = 0


# What a formation rule answers: rows worth waiting for, and until when (batcher clock).
Target = tuple[int, float]
NO_WAIT: Target = (0, float("-inf"))  # start whatever is queued at once


@dataclass
class LastBatch:
    """The last finished batch: when, how many rows it answered, and how many were queued then."""

    done_at: float
    answered: int
    queued: int


def classic_target(first_enqueued: float, timeout_s: float, max_batch_size: int) -> Target:
    """The classic rule: wait for a full batch, at most `timeout_s` after the first item was queued;
    under load the queue filled while the slot was busy: a no-op."""
    return max_batch_size, first_enqueued + timeout_s


def adaptive_target(
    now: float,
    last: LastBatch,
    queued: int,
    decoding: int,
    ready_at: Callable[[], float],
    watch: ReturnWatch,
    costs: ModelCosts,
    max_batch_size: int,
) -> Target:
    """Right after a batch finished: the larger of the two waits worth making (see the module
    docstring); `ready_at()` is when the last row being decoded is expected (read only if needed)."""
    return max(
        returns_target(now, last, queued, watch, costs, max_batch_size),
        decoding_target(now, queued, decoding, ready_at, costs, max_batch_size),
    )


def returns_target(
    now: float, last: LastBatch, queued: int, watch: ReturnWatch, costs: ModelCosts, max_batch_size: int
) -> Target:
    """The callers the last batch answered, if they come back (a closed loop) and it pays."""
    target = min(max_batch_size, last.queued + last.answered)
    if target <= max(queued, 1) or not watch.returns_expected:
        return NO_WAIT
    until = now + costs.worth_waiting(queued, target)
    expected = watch.delay.value
    if until <= now or (expected is not None and until < last.done_at + expected):
        return NO_WAIT  # they would come back too late to pay for the wait
    return target, until


def decoding_target(
    now: float,
    queued: int,
    decoding: int,
    ready_at: Callable[[], float],
    costs: ModelCosts,
    max_batch_size: int,
) -> Target:
    """Rows admitted and still being decoded: worth waiting for until their expected decode end,
    if the bigger batch pays. While they decode, a small batch computing beside them would also
    take the CPU their decoding needs."""
    if not decoding:
        return NO_WAIT
    target = min(max_batch_size, queued + decoding)
    if target <= max(queued, 1):
        return NO_WAIT
    worth = costs.worth_waiting(queued, target)
    ready = ready_at() - now
    if ready > worth:
        return NO_WAIT
    # An overdue or unknown decode end: they are expected any moment, within the break-even wait.
    return target, now + (worth if ready <= 0 else min(worth, 2 * ready))
