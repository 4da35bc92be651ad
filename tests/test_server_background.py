"""A new version's load, warm-up and XLA compile stay behind the version serving (background.py).

ServingFirst runs on a fake clock here, so what it waits for is exact; the manager test uses fake
models (no TensorFlow) and checks the order of events, never a duration.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
import time
from typing import ClassVar

import numpy as np
import pytest
from fovea.server.background import (
    BACKGROUND_SWITCH_INTERVAL_S,
    LOWEST_PRIORITY,
    ServingFirst,
    handing_gil_often,
    lower_thread_priority,
)
from test_server_faults import FakeModel, FakeStorage, manager


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_background_call_waits_while_serving_is_busy_for_at_most_its_last_cost() -> None:
    t = FakeTime()
    busy_until = [math.inf]
    pace = ServingFirst(lambda: t.now < busy_until[0], t.clock, t.sleep)
    started: list[float] = []

    def call(cost: float):
        def run() -> float:
            started.append(t.now)
            t.sleep(cost)
            return cost

        return run

    assert pace.run(call(0.2)) == 0.2
    assert started == [0.0]  # the first call: its cost is unknown, it runs at once
    busy_until[0] = t.now + 0.05  # serving finishes its batch 50 ms from now
    pace.run(call(0.1))
    assert 0.25 <= started[1] <= 0.25 + 0.2 / 50 + 1e-9  # it waited for that, and not longer
    # Saturated (busy for ever): it waits the previous call's cost, 100 ms, then runs anyway.
    busy_until[0] = math.inf
    before = t.now
    pace.run(call(0.1))
    assert started[2] == pytest.approx(before + 0.1)
    busy_until[0] = 0.0  # idle: at once
    before = t.now
    pace.run(call(0.1))
    assert started[3] == before
    assert pace.waited_s == pytest.approx((started[1] - 0.2) + 0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_lowering_a_thread_leaves_the_others_alone() -> None:
    seen: dict[str, int] = {}

    def background() -> None:
        seen["lowered"] = lower_thread_priority()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=background)
    thread.start()
    thread.join()
    if not seen["lowered"]:
        pytest.skip("this sandbox forbids setpriority on a thread")
    assert seen["nice"] == LOWEST_PRIORITY
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice


class BlockingModel(FakeModel):
    """Version 1: its model call holds until `go` is set, so its batcher is busy meanwhile."""

    go = threading.Event()

    def predict(self, images: np.ndarray) -> np.ndarray:
        self.go.wait(30)
        return super().predict(images)


class WarmingModel(FakeModel):
    """Version 2: two warm-up calls. The first lasts a second and ends by releasing version 1's
    call; the second notes whether version 1 was still busy when it ran."""

    busy_at_second_call: ClassVar[list[bool]] = []
    serving_busy = staticmethod(lambda: False)

    def warm_up(self, batch_sizes, pace) -> None:
        def first() -> None:
            time.sleep(1.0)
            BlockingModel.go.set()

        pace(first)
        pace(lambda: self.busy_at_second_call.append(self.serving_busy()))


async def test_warm_up_waits_while_the_serving_version_computes() -> None:
    storage = FakeStorage({"m": [1]})
    mgr, _, _ = manager(storage)
    models = {1: BlockingModel, 2: WarmingModel}
    mgr._load_model = lambda path, name, version: models[version](name, version)
    WarmingModel.serving_busy = staticmethod(mgr.serving_busy)
    await mgr.poll_once()
    v1 = mgr.lookup("m", 1)
    computing = asyncio.create_task(v1.infer([np.zeros((2, 2, 3), np.uint8)]))
    for _ in range(500):
        if mgr.serving_busy():
            break
        await asyncio.sleep(0.01)
    assert mgr.serving_busy()
    storage.models["m"] = [1, 2]
    await mgr.poll_once()  # loads and warms version 2 while version 1 computes
    await computing
    assert mgr.loaded_versions("m") == [2]
    # Without the pacing the second call ran right after the first, with version 1 still busy.
    assert WarmingModel.busy_at_second_call == [False]
    assert not mgr.serving_busy()
    await mgr.close()


def test_background_work_hands_the_gil_over_often_and_restores_the_interval() -> None:
    before = sys.getswitchinterval()
    assert before > BACKGROUND_SWITCH_INTERVAL_S  # CPython's 5 ms default, unless a test changed it
    inside: list[float] = []
    first_in, second_done = threading.Event(), threading.Event()

    def first() -> None:
        inside.append(sys.getswitchinterval())
        first_in.set()
        second_done.wait(10)
        inside.append(sys.getswitchinterval())  # the other user left: still lowered for this one

    def second() -> None:
        first_in.wait(10)
        handing_gil_often(lambda: inside.append(sys.getswitchinterval()))
        second_done.set()

    threads = [threading.Thread(target=handing_gil_often, args=(first,)), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert inside == [BACKGROUND_SWITCH_INTERVAL_S] * 3
    assert sys.getswitchinterval() == before
    with pytest.raises(ZeroDivisionError):  # restored after a failed load too
        handing_gil_often(lambda: 1 / 0)
    assert sys.getswitchinterval() == before


async def test_a_load_and_its_warm_up_run_with_the_gil_handed_over_often() -> None:
    seen: list[float] = []

    class Recording(FakeModel):
        def warm_up(self, batch_sizes, pace) -> None:
            seen.append(sys.getswitchinterval())

    def load(path, name, version):
        seen.append(sys.getswitchinterval())
        return Recording(name, version)

    mgr, _, _ = manager(FakeStorage({"m": [1]}))
    mgr._load_model = load
    await mgr.poll_once()
    assert mgr.loaded_versions("m") == [1]
    assert seen == [BACKGROUND_SWITCH_INTERVAL_S] * 2
    assert sys.getswitchinterval() > BACKGROUND_SWITCH_INTERVAL_S
    await mgr.close()


FREEZE_CHILD = """
import gc, weakref
from fovea.server.background import freeze_runtime_objects

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

gc.disable()  # only the calls below collect
dead_before = cycle()  # garbage when the freeze runs: freed, not frozen
kept = Node()
kept.self = kept
frozen = freeze_runtime_objects()
assert dead_before() is None, "garbage alive at the freeze was frozen instead of freed"
assert frozen == gc.get_freeze_count() > 0
assert all(kept is not o for o in gc.get_objects()), "an object alive at the freeze is still scanned"
dead_after = cycle()  # a version loaded later: its garbage must stay collectable
gc.collect()
assert dead_after() is None, "garbage made after the freeze was not collected"
print("ok", frozen)
"""


def test_freezing_the_runtime_frees_garbage_first_and_leaves_later_objects_collectable(fovea_env) -> None:
    # A child process: the freeze is process-wide and would keep this test run's objects forever.
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", FREEZE_CHILD], env=fovea_env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr


def test_the_serve_process_freezes_the_runtime_before_it_loads_a_version(tmp_path, fovea_env) -> None:
    """Frozen after a load, a version's cyclic garbage would never be freed (a leak per hot swap)."""
    import subprocess

    from _models import LABELS, build_tiny_model
    from _serving import serve_command
    from fovea.trainer.export import export_model

    export_model(build_tiny_model(16), models_dir=str(tmp_path), name="m", labels=LABELS,
                 input_size=(16, 16), backbone="tiny-cnn")  # fmt: skip
    flags = ("--port", "0", "--metrics-port", "0", "--http-port", "0", "--log-level", "DEBUG")
    proc = subprocess.Popen(
        serve_command("--model-dir", str(tmp_path), "--host", "127.0.0.1", *flags),
        env=fovea_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "loading m version 1" in line:
                break
    finally:
        proc.kill()
        proc.wait(30)
    froze = [i for i, line in enumerate(lines) if "left out of full garbage collections" in line]
    assert froze and "loading m version 1" in lines[-1] and froze[0] < len(lines) - 1, "".join(lines[-30:])
