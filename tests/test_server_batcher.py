"""The batcher with a fake model: no grpc, no TensorFlow, milliseconds each."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time

import numpy as np
import pytest
from fovea.devtools.virtual_time import CostModelSleeper, VirtualExecutor, VirtualTimeLoop
from fovea.server.batch_costs import EXPLORE_EVERY, FasterOf
from fovea.server.batcher import Batcher, BatcherStats, LowPriorityDropped, warmup_sizes
from fovea.server.errors import DeadlineExceeded, ResourceExhausted, Unavailable


class FakeModel:
    """Output row = input row * 10 (so a caller can check it got its own rows); records batches."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.batches: list[np.ndarray] = []
        self.gate: threading.Event | None = None
        self.calls = 0  # model calls started (a worker thread is inside once this grows)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(5)
        if self.delay:
            time.sleep(self.delay)
        self.batches.append(batch.copy())
        if self.fail_on is not None and self.fail_on in batch:
            raise ValueError("poisoned batch")
        return batch * 10


class Stats(BatcherStats):
    def __init__(self) -> None:
        self.shed_n = self.expired_n = self.cancelled_n = 0
        self.sizes: list[tuple[int, int]] = []
        self.waits: list[list[float]] = []

    def shed(self) -> None:
        self.shed_n += 1

    def expired(self, requests: int) -> None:
        self.expired_n += requests

    def cancelled(self, requests: int) -> None:
        self.cancelled_n += requests

    def batch(self, images, padding, queue_waits, compute_s) -> None:
        self.sizes.append((images, padding))
        self.waits.append(list(queue_waits))


class FakeClock:
    """The batcher's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def until(predicate, timeout: float = 5.0) -> None:
    """Wait on state, not on a time window: yield to the loop (and the worker thread) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the batcher's state"
        await asyncio.sleep(0.001)


def rows(*values: int) -> list[np.ndarray]:
    return [np.array([v], dtype=np.int64) for v in values]


def values(out) -> list[int]:
    return [int(r[0]) for r in out]


async def test_concurrent_callers_are_batched_and_get_their_own_rows() -> None:
    model, stats = FakeModel(), Stats()
    b = Batcher(model, max_batch_size=8, batch_timeout_s=0.05, stats=stats)
    outs = await asyncio.gather(*(b.submit(rows(i, 100 + i)) for i in range(4)))
    for i, out in enumerate(outs):
        assert values(out) == [10 * i, 10 * (100 + i)]
    assert [len(x) for x in model.batches] == [8]
    assert stats.sizes == [(8, 0)]
    await b.close()


async def test_max_batch_size_splits_work() -> None:
    model = FakeModel()
    b = Batcher(model, max_batch_size=3, batch_timeout_s=0.05)
    outs = await asyncio.gather(*(b.submit(rows(i)) for i in range(7)))
    assert [values(o) for o in outs] == [[10 * i] for i in range(7)]
    assert all(len(x) <= 3 for x in model.batches)
    assert sum(len(x) for x in model.batches) == 7
    # A request larger than a batch is split across batches and reassembled in order.
    out = await b.submit(rows(*range(8)))
    assert values(out) == [10 * i for i in range(8)]
    await b.close()


async def test_timeout_is_measured_from_first_item() -> None:
    model, clock, stats = FakeModel(), FakeClock(), Stats()
    b = Batcher(model, max_batch_size=64, batch_timeout_s=1000.0, clock=clock, stats=stats)
    first = asyncio.ensure_future(b.submit(rows(1)))
    await until(lambda: b.queue_depth == 1)
    clock.now = 600.0
    second = asyncio.ensure_future(b.submit(rows(2)))
    await until(lambda: b.queue_depth == 2)
    clock.now = 1000.0  # the timeout, counted from the first item (from the second it would be 1600)
    b.poke()
    await asyncio.gather(first, second)
    assert [len(x) for x in model.batches] == [2]
    assert stats.waits == [[1000.0, 400.0]]  # it ran at 1000 on the batcher's clock, not before
    await b.close()


async def test_zero_timeout_runs_at_once_and_batches_under_load() -> None:
    model = FakeModel()
    model.gate = threading.Event()
    b = Batcher(model, max_batch_size=16, batch_timeout_s=0.0, max_in_flight=1, clock=FakeClock())
    first = asyncio.ensure_future(b.submit(rows(1)))
    await until(lambda: model.calls == 1)  # runs at once: the clock never moved
    outs = [asyncio.ensure_future(b.submit(rows(i))) for i in range(10)]
    await until(lambda: b.queue_depth == 10)  # queued while the only slot computes
    model.gate.set()
    assert values(await first) == [10]
    assert [values(await o) for o in outs] == [[10 * i] for i in range(10)]
    assert [len(x) for x in model.batches] == [1, 10]  # the queue formed one batch
    await b.close()


async def test_queue_bound_sheds() -> None:
    model, stats = FakeModel(), Stats()
    model.gate = threading.Event()
    b = Batcher(model, max_batch_size=2, max_queue_size=1, max_in_flight=1, stats=stats)
    running = asyncio.ensure_future(b.submit(rows(1)))  # taken by the worker, blocked on the gate
    await until(lambda: model.calls == 1)
    queued = asyncio.ensure_future(b.submit(rows(2)))  # waits in the queue
    await until(lambda: b.queue_depth == 1)
    with pytest.raises(ResourceExhausted, match="max-queue-size"):
        await b.submit(rows(3))
    assert stats.shed_n == 1
    model.gate.set()
    assert values(await running) == [10] and values(await queued) == [20]
    await b.close()


@pytest.mark.parametrize("ahead", [False, True], ids=["queued", "formed-ahead"])
async def test_row_whose_deadline_passes_before_compute_is_never_computed(ahead: bool) -> None:
    model, stats = FakeModel(), Stats()
    model.gate = threading.Event()
    clock = FakeClock()
    b = Batcher(model, max_batch_size=2, max_in_flight=1, stats=stats, clock=clock)
    running = asyncio.ensure_future(b.submit(rows(1)))
    await until(lambda: model.calls == 1)
    late = asyncio.ensure_future(b.submit(rows(2), deadline=10.0))
    # A second row fills the batch, which is then formed ahead of the running one, out of the queue.
    kept = asyncio.ensure_future(b.submit(rows(3))) if ahead else None
    await until(lambda: b.batches_in_flight == 2 if ahead else b.queue_depth == 1)
    clock.now = 10.0  # the deadline passes while it waits
    model.gate.set()
    assert values(await running) == [10]
    with pytest.raises(DeadlineExceeded):
        await late
    if kept is not None:
        assert values(await kept) == [30]
    assert stats.expired_n == 1
    assert all(2 not in x for x in model.batches)
    await b.close()


async def test_cancelled_request_is_dropped_before_compute() -> None:
    model, stats = FakeModel(), Stats()
    model.gate = threading.Event()
    b = Batcher(model, max_batch_size=4, max_in_flight=1, stats=stats)
    running = asyncio.ensure_future(b.submit(rows(1)))
    await until(lambda: model.calls == 1)
    doomed = asyncio.ensure_future(b.submit(rows(2)))
    kept = asyncio.ensure_future(b.submit(rows(3)))
    await until(lambda: b.queue_depth == 2)
    doomed.cancel()
    model.gate.set()
    assert values(await running) == [10] and values(await kept) == [30]
    assert stats.cancelled_n == 1
    assert all(2 not in x for x in model.batches)
    await b.close()


async def test_full_batch_formed_ahead_starts_without_the_event_loop() -> None:
    # Under overload the loop is busy answering and refusing requests; the model must not sit idle
    # until the loop sees the running batch finish. A full batch waits at the executor instead.
    model = FakeModel()
    model.gate = threading.Event()
    second = threading.Event()
    inner = model.__call__

    def infer(batch: np.ndarray) -> np.ndarray:
        if model.calls == 1:
            second.set()  # the second model call has begun
        return inner(batch)

    b = Batcher(infer, max_batch_size=2, max_in_flight=1)
    running = asyncio.ensure_future(b.submit(rows(1)))
    await until(lambda: model.calls == 1)
    ahead = [asyncio.ensure_future(b.submit(rows(v))) for v in (2, 3)]
    await until(lambda: b.batches_in_flight == 2)  # the full batch left the queue for the executor
    model.gate.set()
    # Block the event loop: only the worker thread can start the next batch now.
    assert second.wait(5), "the full batch did not start until the event loop was free"
    assert values(await running) == [10]
    assert [values(await f) for f in ahead] == [[20], [30]]
    await b.close()


async def test_partial_batch_waits_in_the_queue_while_one_computes() -> None:
    model = FakeModel()
    model.gate = threading.Event()
    b = Batcher(model, max_batch_size=4, max_in_flight=1)
    running = asyncio.ensure_future(b.submit(rows(1)))
    await until(lambda: model.calls == 1)
    queued = [asyncio.ensure_future(b.submit(rows(v))) for v in (2, 3, 4)]
    await until(lambda: b.queue_depth == 3)  # not full: it may still grow, so it stays queued
    model.gate.set()
    assert values(await running) == [10]
    assert [values(await f) for f in queued] == [[20], [30], [40]]
    assert [len(x) for x in model.batches] == [1, 3]
    await b.close()


async def test_allowed_sizes_pad_and_results_exclude_padding() -> None:
    model, stats = FakeModel(), Stats()
    b = Batcher(model, max_batch_size=8, batch_timeout_s=0.05, allowed_batch_sizes=(1, 4, 8), stats=stats)
    outs = await asyncio.gather(*(b.submit(rows(i + 1)) for i in range(3)))
    assert [values(o) for o in outs] == [[10], [20], [30]]
    assert [len(x) for x in model.batches] == [4]
    assert stats.sizes == [(3, 1)]
    await b.close()
    assert warmup_sizes(8, (1, 4, 8, 16)) == [1, 4, 8]
    assert warmup_sizes(6, (2, 4, 8, 16)) == [2, 4, 8]
    assert warmup_sizes(8, ()) == [1, 8]


async def test_errors_reach_exactly_the_affected_callers() -> None:
    model = FakeModel(fail_on=13)
    b = Batcher(model, max_batch_size=2, batch_timeout_s=0.05)
    results = await asyncio.gather(
        b.submit(rows(1)), b.submit(rows(13)), b.submit(rows(3)), b.submit(rows(4)), return_exceptions=True
    )
    # Batches are [1, 13] and [3, 4]: the first batch fails for both its callers, the second succeeds.
    assert isinstance(results[0], ValueError) and isinstance(results[1], ValueError)
    assert values(results[2]) == [30] and values(results[3]) == [40]
    await b.close()


async def test_wrong_number_of_results_is_an_error() -> None:
    b = Batcher(lambda batch: batch[:-1], max_batch_size=4, batch_timeout_s=0.02)
    results = await asyncio.gather(b.submit(rows(1)), b.submit(rows(2)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "returned 1 rows for a batch of 2" in str(r) for r in results)
    await b.close()


async def test_in_flight_batches_run_concurrently() -> None:
    model = FakeModel()
    model.gate = threading.Event()
    b = Batcher(model, max_batch_size=1, max_in_flight=2)
    both = asyncio.gather(b.submit(rows(1)), b.submit(rows(2)))
    await until(lambda: model.calls == 2)  # both inside the model at once, neither finished
    model.gate.set()
    assert [values(o) for o in await both] == [[10], [20]]
    await b.close()


async def test_close_drains_queue_then_refuses() -> None:
    model = FakeModel()
    b = Batcher(model, max_batch_size=1, max_in_flight=1)
    pending = [asyncio.ensure_future(b.submit(rows(i))) for i in range(4)]
    await until(lambda: b.queue_depth + model.calls >= 4)
    await b.close(drain=True)
    assert [values(await p) for p in pending] == [[0], [10], [20], [30]]
    with pytest.raises(Unavailable):
        await b.submit(rows(5))


async def test_close_without_drain_fails_queued() -> None:
    model = FakeModel()
    model.gate = threading.Event()
    b = Batcher(model, max_batch_size=2, max_in_flight=1)
    running = asyncio.ensure_future(b.submit(rows(1)))
    await until(lambda: model.calls == 1)
    queued = asyncio.ensure_future(b.submit(rows(2)))
    await until(lambda: b.queue_depth == 1)
    closing = asyncio.ensure_future(b.close(drain=False))
    await until(lambda: queued.done())  # failed at once, while the running batch still computes
    model.gate.set()
    await closing
    assert values(await running) == [10]
    with pytest.raises(Unavailable):
        await queued


async def test_empty_queue_admits_a_request_larger_than_the_bound() -> None:
    model = FakeModel()
    b = Batcher(model, max_batch_size=1, max_queue_size=1)
    assert values(await b.submit(rows(1, 2, 3))) == [10, 20, 30]
    await b.close()


async def test_gate_counts_holders_refuses_after_close_and_waits_for_idle() -> None:
    from fovea.server.lease import Gate, GateClosed

    gate = Gate()
    assert await gate.wait_idle(0)
    gate.enter()
    with gate.held():
        assert gate.count == 2
    assert gate.count == 1 and not await gate.wait_idle(0.01)
    gate.close()
    with pytest.raises(GateClosed):
        gate.enter()
    assert gate.count == 1  # the refused caller was not counted
    waiter = asyncio.ensure_future(gate.wait_idle())
    await asyncio.sleep(0)
    assert not waiter.done()
    gate.exit()
    assert await waiter


async def test_gate_part_held_is_given_back_once() -> None:
    # The core's decode queue counts a request's encoded images this way: given back once decoded,
    # before the block (the rest of the request) ends.
    from fovea.server.lease import Gate

    gate = Gate()
    with gate.held(3) as part:
        gate.enter(2)
        assert gate.count == 5 and not await gate.wait_idle(0)
        part.release()
        part.release()
        assert gate.count == 2
    assert gate.count == 2  # the block's end gave nothing back twice
    gate.exit(2)
    assert await gate.wait_idle(0)
    with gate.held(0):
        assert await gate.wait_idle(0)  # holding none keeps it idle


async def test_expected_wait_is_learned_and_sheds_before_any_work() -> None:
    # Each batch takes 2 s on the batcher's clock: the model moves the fake clock while it runs.
    clock, stats = FakeClock(), Stats()

    def model(batch: np.ndarray) -> np.ndarray:
        clock.now += 2.0 * len(batch)  # 2 s per row
        return batch * 10

    gate, entered = threading.Event(), threading.Event()

    def gated(batch: np.ndarray) -> np.ndarray:
        entered.set()
        gate.wait(5)
        return model(batch)

    b = Batcher(gated, max_batch_size=4, max_queue_size=100, max_queue_wait_s=5.0, stats=stats, clock=clock)
    gate.set()
    await b.submit(rows(1))  # learns 2 s per row
    assert b.expected_wait(1) == 2.0
    gate.clear()
    entered.clear()
    running = asyncio.ensure_future(b.submit(rows(1, 2)))  # 2 rows computing: 4 s ahead
    # Inside the model (its start recorded), not only handed to the worker thread: a loaded machine
    # can start the thread late, and the "what remains of it" check below needs the start.
    await until(entered.is_set)
    assert b.expected_wait() == 4.0
    # 4 s ahead of the first: its own 2 s never count against the 5 s bound, but they count for the
    # request behind it, 6 s ahead of that one.
    with b.admit(1), pytest.raises(ResourceExhausted, match=r"expected wait is 6\.00 s"), b.admit(1):
        pass
    # The caller's deadline counts too: 4 s ahead plus its own 2 s would end after it.
    b.max_queue_wait_s = 100.0
    with pytest.raises(ResourceExhausted, match="deadline"), b.admit(1, deadline=clock.now + 5.0):
        pass
    with b.admit(1, deadline=clock.now + 7.0):  # admitted: its place counts for those behind it
        assert b.expected_wait() == 6.0
    assert stats.shed_n == 2
    # A running batch costs what remains of it, not all of it: 1.5 s into its expected 4 s.
    clock.now += 1.5
    assert b.expected_wait() == 2.5
    with b.admit(1):
        assert b.expected_wait() == 4.5
    gate.set()
    assert values(await running) == [10, 20]
    await b.close()


class TimedModel:
    """A model whose compute time is fake: each call moves `clock` on by `cost(batch size)` seconds.

    The clock is the real monotonic clock plus the fake compute, so the batcher's waits (real sleeps)
    stay short while the times it learns are exact.
    """

    def __init__(self, cost) -> None:
        self.cost = cost
        self.offset = 0.0
        self.sizes: list[int] = []

    def clock(self) -> float:
        return time.monotonic() + self.offset

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.offset += self.cost(len(batch))
        self.sizes.append(len(batch))
        return batch * 10


async def test_compute_time_is_learned_per_size() -> None:
    model = TimedModel(lambda n: 10.0 + n)
    b = Batcher(model, max_batch_size=16, clock=model.clock)
    assert b.expected_compute_s(4) == 0.0  # nothing learned yet
    await b.submit(rows(*range(4)))
    assert b.expected_compute_s(2) == pytest.approx(7.0, abs=0.5)  # below the smallest seen: per row
    await b.close()
    model = TimedModel(lambda n: 10.0 + n)
    b = Batcher(model, max_batch_size=16, clock=model.clock)
    await b.submit(rows(1))
    await b.submit(rows(*range(8)))
    assert model.sizes == [1, 8]
    assert b.expected_compute_s(1) == pytest.approx(11.0, abs=0.5)
    assert b.expected_compute_s(8) == pytest.approx(18.0, abs=0.5)
    assert b.expected_compute_s(4) == pytest.approx(11.0 + 7.0 * 3 / 7, abs=0.5)  # interpolated
    assert b.expected_compute_s(16) == pytest.approx(26.0, abs=0.5)  # the slope of the largest two
    model.cost = lambda n: 28.0
    await b.submit(rows(*range(8)))
    assert b.expected_compute_s(8) == pytest.approx(18.0 + 0.3 * 10.0, abs=0.5)  # an EWMA
    await b.close()


class InlineExecutor(concurrent.futures.Executor):
    """Runs each call at once in the caller's thread: with it the order of events, and so every
    batch, is the same on every run."""

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


def _virtual(main) -> None:
    """Run `main(loop)` on a virtual-time loop: nothing sleeps, and every run gives the same batches."""
    loop = VirtualTimeLoop()
    try:
        loop.run_until_complete(main(loop))
    finally:
        loop.close()


def _virtual_batcher(loop: VirtualTimeLoop, cost, **options) -> tuple[Batcher, CostModelSleeper]:
    model = CostModelSleeper(cost, loop)
    return Batcher(model, executor=VirtualExecutor(loop), clock=loop.clock, **options), model


def _warm(b: Batcher, model: CostModelSleeper) -> None:
    """What the server's warm-up does: each batch size it can emit ran once (1 and the maximum)."""
    b.seed_costs({n: model.cost(n) for n in (1, b.max_batch_size)})


async def _closed_loop(b: Batcher, callers: int, rounds: int, rtt: float = 0.01) -> None:
    """`callers` clients, each sending its next request a round trip after its answer (caller i's
    round trip is (i + 1) * rtt virtual seconds, so they come back one by one)."""

    async def caller(i: int) -> None:
        for r in range(rounds):
            assert values(await b.submit(rows(i * 1000 + r))) == [i * 1000 + r]
            await asyncio.sleep((i + 1) * rtt)

    await asyncio.gather(*(caller(i) for i in range(callers)))


@pytest.mark.parametrize("callers", [4, 16])
def test_closed_loop_batches_carry_every_caller(callers: int) -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        # Compute takes 1 s whatever the size, and callers return within 0.16 s: waiting pays.
        b, model = _virtual_batcher(loop, lambda n: 1.0, max_batch_size=32)
        _warm(b, model)
        await _closed_loop(b, callers=callers, rounds=12)
        sizes = model.sizes
        # After the first round (callers arrive at once) batches carry every caller: at least all but
        # the first and the last (callers finish a round apart). Without the wait sizes alternate
        # (1/3/1/3 for four callers) and almost none do.
        assert sizes.count(callers) >= 10, sizes
        assert b.formation_waits > 0
        await b.close()

    _virtual(main)


def test_a_late_caller_is_waited_for_while_the_wait_pays() -> None:
    # Returns have a long tail: callers come back after 5 ms, but one in four rounds the last one
    # takes 15 ms (traced on this host: 5 ms, now and then 12-21 ms). Waiting for it pays: with
    # three queued (70 ms) the break-even wait for a fourth (80 ms) is 13 ms more, to 18 ms. A wait
    # cut at twice the typical return started batches without it.
    async def main(loop: VirtualTimeLoop) -> None:
        b, model = _virtual_batcher(loop, lambda n: 0.04 + 0.01 * n, max_batch_size=32)
        _warm(b, model)

        async def caller(i: int) -> None:
            for r in range(24):
                assert values(await b.submit(rows(i * 1000 + r))) == [i * 1000 + r]
                await asyncio.sleep(0.015 if i == 3 and r % 4 == 3 else 0.005)

        await asyncio.gather(*(caller(i) for i in range(4)))
        assert model.sizes[2:-1] == [4] * (len(model.sizes) - 3), model.sizes
        await b.close()

    _virtual(main)


def test_eager_formation_alternates_small_batches() -> None:
    # Without the wait, callers that come back one by one split into alternating small batches:
    # the pattern the adaptive formation exists to prevent.
    async def main(loop: VirtualTimeLoop) -> None:
        b, model = _virtual_batcher(loop, lambda n: 1.0, max_batch_size=32, formation="eager")
        _warm(b, model)
        await _closed_loop(b, callers=4, rounds=6)
        assert b.formation_waits == 0
        assert sum(model.sizes) == 24 and 1 in model.sizes
        await b.close()

    _virtual(main)


def test_closed_loop_never_waits_past_max_batch_size() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        b, model = _virtual_batcher(loop, lambda n: 1.0, max_batch_size=4)
        _warm(b, model)
        await _closed_loop(b, callers=8, rounds=8)
        assert max(model.sizes) == 4 and sum(model.sizes) == 64
        await b.close()

    _virtual(main)


def test_no_wait_when_a_bigger_batch_does_not_pay() -> None:
    # Compute grows in proportion to the batch (no fixed cost to share): waiting for the callers
    # would only add idle time, so the batcher never waits.
    async def main(loop: VirtualTimeLoop) -> None:
        b, model = _virtual_batcher(loop, lambda n: 1.0 * n, max_batch_size=32)
        _warm(b, model)
        await _closed_loop(b, callers=4, rounds=8)
        assert b.formation_waits == 0
        await b.close()

    _virtual(main)


def test_arrivals_that_do_not_follow_answers_are_not_waited_for() -> None:
    # Open loop: Poisson arrivals at half the model's speed. After a few batches the batcher has seen
    # that arrivals keep coming after the answered callers would be back, and stops waiting.
    async def main(loop: VirtualTimeLoop) -> None:
        b, model = _virtual_batcher(loop, lambda n: 0.01 + 0.001 * n, max_batch_size=32)
        _warm(b, model)
        rng = random.Random(1)
        tasks = []
        for i in range(400):
            tasks.append(asyncio.ensure_future(b.submit(rows(i))))
            await asyncio.sleep(rng.expovariate(0.5 * 32 / 0.042))
        await asyncio.gather(*tasks)
        early = b.formation_waits
        for i in range(400):
            tasks.append(asyncio.ensure_future(b.submit(rows(i))))
            await asyncio.sleep(rng.expovariate(0.5 * 32 / 0.042))
        await asyncio.gather(*tasks)
        assert b.formation_waits - early <= 4, (early, b.formation_waits)  # the learned state holds
        await b.close()

    _virtual(main)


def test_a_lone_caller_is_never_held() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        b, model = _virtual_batcher(loop, lambda n: 1.0, max_batch_size=32)
        _warm(b, model)
        await _closed_loop(b, callers=1, rounds=10)
        assert model.sizes == [1] * 10
        assert b.formation_waits == 0
        await b.close()

    _virtual(main)


async def test_next_batch_waits_for_rows_being_decoded() -> None:
    # Rows admitted and still being decoded arrive soon; computing a small batch meanwhile would take
    # the CPU their decoding needs. Without the wait the batches here are 1, 1, 2.
    model = TimedModel(lambda n: 1.0)
    b = Batcher(model, max_batch_size=8, clock=model.clock, executor=InlineExecutor())
    await b.submit(rows(*range(8)))  # the warm-up: batch sizes 8 and 1 cost the same (a fixed cost)
    await b.submit(rows(0))  # the next batch forms right after this one
    with b.admit(2) as place:  # two rows being decoded
        first = asyncio.ensure_future(b.submit(rows(1)))
        for _ in range(5):  # event-loop turns, not time: the batcher sees the queued row
            await asyncio.sleep(0)
        assert not first.done()
        rest = await b.submit(rows(2, 3), place=place)
    assert values(await first) == [10] and values(rest) == [20, 30]
    assert model.sizes == [8, 1, 3]
    assert b.formation_waits == 1
    await b.close()


async def test_tiny_batches_with_nothing_behind_them_run_on_the_loop() -> None:
    # The bound is generous here: the learned time includes the hop to the worker thread, which a
    # loaded test machine can stretch.
    model = TimedModel(lambda n: 0.0)
    b = Batcher(model, max_batch_size=8, clock=model.clock, inline_below_s=0.5)
    for i in range(5):
        assert values(await b.submit(rows(i))) == [10 * i]
    assert b.inline_batches == 4  # the first batch of a size runs on the worker: nothing learned yet
    slow = TimedModel(lambda n: 1.0)
    b2 = Batcher(slow, max_batch_size=8, clock=slow.clock, inline_below_s=0.5)
    for i in range(3):
        await b2.submit(rows(i))
    assert b2.inline_batches == 0  # a model slower than the bound always runs on the worker
    await b.close()
    await b2.close()


def test_the_faster_way_is_learned_from_serving_calls() -> None:
    # Timed quietly, way 1 (XLA, say) looked faster; under load it takes 3 s against way 0's 1 s.
    # Its first serving call moves the choice to way 0, which keeps it.
    choice = FasterOf(1.0, 0.5)
    cost = {0: 1.0, 1: 3.0}
    picks = []
    for _ in range(200):
        way = choice.pick()
        picks.append(way)
        choice.record(way, cost[way])
    assert choice.preferred == 0
    assert picks[0] == 1 and picks[1:15] == [0] * 14
    # Way 1 from then on only when it is re-timed, one call in EXPLORE_EVERY.
    assert picks[-96:].count(1) == 96 // EXPLORE_EVERY


def test_low_priority_work_never_goes_ahead_of_live_work() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        b, model = _virtual_batcher(loop, lambda n: 1.0, max_batch_size=4)
        _warm(b, model)
        # Alone, a shadow run computes (on a free slot).
        assert values(await b.submit(rows(1), low_priority=True)) == [1]
        # With live work queued it is dropped at once.
        running = asyncio.ensure_future(b.submit(rows(2)))
        await asyncio.sleep(0.5)  # the live row computes; another waits behind it
        queued = asyncio.ensure_future(b.submit(rows(3)))
        await asyncio.sleep(0)
        with pytest.raises(LowPriorityDropped):
            await b.submit(rows(4), low_priority=True)
        # Queued while the model is busy with nothing live waiting, then live work arrives: the
        # shadow row is dropped when the live batch forms, and never computed.
        assert values(await running) == [2] and values(await queued) == [3]
        blocker = asyncio.ensure_future(b.submit(rows(5)))
        await asyncio.sleep(0.1)
        shadow = asyncio.ensure_future(b.submit(rows(6), low_priority=True))
        await asyncio.sleep(0.1)
        late = asyncio.ensure_future(b.submit(rows(7)))
        assert values(await blocker) == [5] and values(await late) == [7]
        with pytest.raises(LowPriorityDropped):
            await shadow
        assert [int(batch[0][0]) for batch in model.batches] == [1, 2, 3, 5, 7]
        await b.close()

    _virtual(main)


def test_low_priority_work_yields_to_another_batchers_live_work() -> None:
    # A shadow version's batcher and the live one share the device: the shadow run gives way while
    # the live batcher has work, and runs once it is idle.
    async def main(loop: VirtualTimeLoop) -> None:
        live, _ = _virtual_batcher(loop, lambda n: 1.0, max_batch_size=4)
        shadow, model = _virtual_batcher(loop, lambda n: 1.0, max_batch_size=4)
        running = asyncio.ensure_future(live.submit(rows(1)))
        await asyncio.sleep(0.5)
        assert live.busy
        with pytest.raises(LowPriorityDropped):
            await shadow.submit(rows(2), low_priority=True, yield_to=lambda: live.busy)
        await running
        assert not live.busy
        assert values(await shadow.submit(rows(3), low_priority=True, yield_to=lambda: live.busy)) == [3]
        assert model.sizes == [1]
        await live.close()
        await shadow.close()

    _virtual(main)
