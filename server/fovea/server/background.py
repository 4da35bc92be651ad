"""Work that must not starve the versions serving traffic: loading, warming and compiling a new one.

A hot reload loads and warms the new version beside the one serving, on the same cores. Two tools keep
that work behind the serving one, and neither is a constant tuned to one machine:

- `lower_thread_priority()` puts the calling thread at the lowest CPU priority (Linux, where each
  thread has its own nice value, and threads it starts inherit it), for work that runs on its own
  thread: the SavedModel load and the XLA compiler.
- `ServingFirst` paces the model calls such work makes (warm-up batches, XLA checks and timings). Those
  run on TensorFlow's shared thread pools, where no thread priority reaches them, so each waits while a
  serving version is busy, for at most what the previous such call took: below saturation they run in
  the gaps between batches; on a saturated server they still get about half the time, so a new
  version always comes up.
- `handing_gil_often(call, ...)` runs a load with CPython's GIL switch interval lowered: the SavedModel
  load is mostly Python, and a thread that wants the GIL (the event loop, the batch worker) otherwise
  waits up to 5 ms each time before it may ask the loader for it. Measured (bench/load_lag.py, ResNet50
  at 96 px on a 2-core host, two runs): the event loop's p99 lag during a load went from 15-18 ms to
  5-7 ms, and the load took as long.
- `freeze_runtime_objects()`, called once before the first version loads, takes what is alive then
  (TensorFlow's and the server's modules, about 320,000 objects) out of the garbage collector's full
  collections. The stall that switch interval could not touch was one: a full collection holds the
  GIL throughout, and the one that frees a released version's cyclic garbage took about 1 s during a
  swap, most of it scanning objects that never die. With them frozen, and with versions exported
  without the Keras layers' functions (contract.WEIGHTS), the longest collection in a swap took
  177-213 ms and the event loop's longest wait 67-75 ms, against 968-1091 and 566-649 ms
  (bench/load_lag.py, ResNet50 at 96 px, 2-core host, 3 rounds; bench/NOTES.md).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

LOWEST_PRIORITY = 19  # the highest nice value: the CPU goes to anything else that wants it first
# The GIL switch interval while background work runs (CPython's default is 5 ms). Not a model speed: it
# bounds how long Python in the background may keep a waiting serving thread off the interpreter, so it
# holds at any model speed. Switching more often costs only when threads contend for the GIL.
BACKGROUND_SWITCH_INTERVAL_S = 0.0005

_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


def lower_thread_priority() -> bool:
    """Give the calling thread the lowest CPU priority; True if it now has it.

    Linux keeps a nice value per thread (setpriority on the thread's id), so this touches no other
    thread; elsewhere the call would renice the whole process, so it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < LOWEST_PRIORITY:
            os.setpriority(os.PRIO_PROCESS, tid, LOWEST_PRIORITY)
    except OSError as exc:  # a sandbox that forbids it: the work still runs, at normal priority
        log.debug("could not lower the priority of thread %d: %s", tid, exc)
        return False
    return True


def handing_gil_often(call: Callable[..., T], *args: Any) -> T:
    """`call(*args)` with the GIL switch interval at BACKGROUND_SWITCH_INTERVAL_S, restored after.

    The interval is process-wide: concurrent users share one lowering, and the last one out restores
    the interval found by the first (a value set meanwhile by anyone else is overwritten).
    """
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_saved, BACKGROUND_SWITCH_INTERVAL_S))
        _switch_users += 1
    try:
        return call(*args)
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


def freeze_runtime_objects() -> int:
    """Collect, then move every object alive now to the collector's permanent generation; their count.

    Call it once, after the imports and before any version loads: what is alive then lives as long as
    the process, so it need not be scanned again. A version loaded later stays collectable, which is
    why this must not run after a load (a frozen version's garbage would never be freed).
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("%d objects alive at start-up left out of full garbage collections", frozen)
    return frozen


class ServingFirst:
    """Runs background model calls one by one, each after the serving versions have had their turn.

    `busy()` says whether any serving version has work queued, being decoded or computing (called from
    the background thread: it must only read). `run(call)` waits while it is busy, for at most the
    previous call's duration, then runs `call` and times it. The first call does not wait (nothing
    says yet what such a call costs; warm-up starts with its smallest batch).
    """

    def __init__(
        self,
        busy: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._busy = busy
        self._clock = clock
        self._sleep = sleep
        self._last_cost = 0.0
        self._lock = threading.Lock()  # the warm-up and the XLA thread may share one pacer
        self.waited_s = 0.0  # total time calls spent waiting (for the log and the tests)

    def wait(self) -> float:
        """Block while a serving version is busy, at most the previous call's duration; seconds waited."""
        limit = self._last_cost
        start = self._clock()
        while self._busy():
            waited = self._clock() - start
            if waited >= limit:
                break
            # Poll often against the calls' own length: an idle gap between batches is short.
            self._sleep(min(limit - waited, max(limit / 50, 1e-4)))
        waited = self._clock() - start
        self.waited_s += waited
        return waited

    def run(self, call: Callable[[], T]) -> T:
        with self._lock:
            self.wait()
            start = self._clock()
            try:
                return call()
            finally:
                self._last_cost = self._clock() - start


def unpaced(call: Callable[[], T]) -> T:
    """The pacer of a load with nothing else serving (a first start, or a test): run at once."""
    return call()
