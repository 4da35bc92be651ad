"""An asyncio event loop whose clock is virtual, and an executor whose work costs virtual time.

The batcher's policies depend on how long the model takes, how soon callers come back and how
requests arrive. Real sleeps make a simulation of them as noisy as the machine it runs on, and a
GPU-speed cost curve (0.2 ms a batch) is below what `time.sleep` and the event loop can keep to.
Here nothing sleeps: when no callback is ready the loop jumps its clock to the next timer, so a
minute of serving runs in a second of CPU and every run with the same seed gives the same batches.

    loop = VirtualTimeLoop()
    executor = VirtualExecutor(loop, workers=1)
    model = CostModelSleeper(lambda n: 0.014 + 0.007 * n, loop)
    batcher = Batcher(model, ..., executor=executor, clock=loop.clock)

There is no I/O: a loop that waits on anything but timers and its own callbacks raises, instead of
hanging. Threads must not be used (`run_in_executor` goes to the `VirtualExecutor`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import selectors
from collections.abc import Callable
from typing import Any


class _NoIOSelector(selectors.BaseSelector):
    """A selector that reports no I/O; waiting `timeout` seconds moves the loop's clock instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self._map: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj, events, data=None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._map[fileobj] = key
        return key

    def unregister(self, fileobj) -> selectors.SelectorKey:
        return self._map.pop(fileobj)

    def select(self, timeout: float | None = None) -> list:
        if timeout is None:
            raise RuntimeError("virtual time: nothing is scheduled and nothing can wake the loop (deadlock)")
        self._loop.now += max(0.0, timeout)
        return []

    def get_map(self):
        return self._map

    def close(self) -> None:
        self._map.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A SelectorEventLoop on virtual time (see the module docstring)."""

    def __init__(self) -> None:
        self.now = 0.0
        # Work "running" in a VirtualExecutor worker advances this instead of the loop's clock, so
        # the code that times it (the batcher's `clock()` before and after) sees its cost.
        self.offset = 0.0
        self.in_worker = False
        super().__init__(_NoIOSelector(self))
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self.now

    def clock(self) -> float:
        """The clock to hand to code under test: loop time, plus the cost of the work it is inside."""
        return self.now + self.offset


class VirtualExecutor(concurrent.futures.Executor):
    """`workers` virtual threads: a call starts when one is free, and its result arrives after the
    virtual seconds it spent (what a `CostModelSleeper` inside it charged)."""

    def __init__(self, loop: VirtualTimeLoop, workers: int = 1) -> None:
        self._loop = loop
        self._idle = workers
        self._pending: collections.deque = collections.deque()

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._pending.append((fn, args, kwargs, future))
        self._pump()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pending.clear()

    def _pump(self) -> None:
        while self._idle and self._pending:
            self._idle -= 1
            self._loop.call_soon(self._start, *self._pending.popleft())

    def _start(self, fn, args, kwargs, future: concurrent.futures.Future) -> None:
        self._loop.offset, self._loop.in_worker = 0.0, True
        try:
            result, error = fn(*args, **kwargs), None
        except Exception as exc:
            result, error = None, exc
        cost, self._loop.offset, self._loop.in_worker = self._loop.offset, 0.0, False
        self._loop.call_at(self._loop.now + cost, self._finish, future, result, error)

    def _finish(self, future: concurrent.futures.Future, result, error) -> None:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
        self._idle += 1
        self._pump()


class CostModelSleeper:
    """A model that returns its input and costs `cost(batch size)` virtual seconds.

    Inside a VirtualExecutor worker the cost is charged to that worker; called on the loop itself
    (the batcher runs tiny batches inline) it blocks the loop, so the loop's clock moves.
    """

    def __init__(self, cost: Callable[[int], float], loop: VirtualTimeLoop) -> None:
        self.cost = cost
        self._loop = loop
        self.sizes: list[int] = []
        self.batches: list = []

    def __call__(self, batch):
        self.sizes.append(len(batch))
        self.batches.append(batch.copy())
        seconds = self.cost(len(batch))
        if self._loop.in_worker:
            self._loop.offset += seconds
        else:
            self._loop.now += seconds
        return batch
