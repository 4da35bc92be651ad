"""Event-loop lag while a new version loads and the old one is released: what a hot swap costs serving.

    python bench/load_lag.py                      # exports ResNet50 at 96 px both ways, 3 rounds (about 4 minutes)
    python bench/load_lag.py --version-dir DIR --keras-version-dir DIR2   # versions already exported

A hot swap loads the new SavedModel on the loader thread while the event loop serves, then releases the
old version, whose cyclic garbage a full collection frees later. Python work holds the GIL, and a full
collection holds it from start to end, so the loop waits. This measures what the serving side sees: an
asyncio task sleeping 1 ms in a loop records how late each wake-up is, while a thread at the lowest
priority (as the server's loader) loads a version through `background.handing_gil_often` (the server's
way since stop 26), releases the one it replaces and runs one full collection, so each way pays for
its own garbage inside its window. Each window runs in a fresh process that first loads the version
being replaced, as a server has; the ways, each round in a shuffled order:

- `keras_format`: versions exported with the Keras object on the root (before contract.WEIGHTS);
- `weights_format`: versions exported as now (the variables only);
- `weights_format_frozen`: the same, with the objects alive before the first load frozen
  (`background.freeze_runtime_objects`, as `fovea serve` does).

It prints every window and the medians over rounds of the lateness (p50, p99, max, and the sum: the
serving time the window took away), the load's duration, and the longest full collection in the
window (`gc_max_ms`, from gc.callbacks).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from fovea.server import loader  # noqa: E402
from fovea.server.background import (  # noqa: E402
    freeze_runtime_objects,
    handing_gil_often,
    lower_thread_priority,
)
from run import make_models, subprocess_env  # noqa: E402  (puts the repository's packages on the path)

WAYS = ("keras_format", "weights_format", "weights_format_frozen")


async def _ticker(stop: threading.Event, lags: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - start - 0.001)


class FullCollections:
    """The longest full (generation 2) collection since it was made, from gc.callbacks."""

    def __init__(self) -> None:
        self.longest_s, self._started = 0.0, 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.longest_s = max(self.longest_s, time.perf_counter() - self._started)


async def one_swap(path: str, frozen: bool) -> dict:
    """Load a version to stand for the serving one, then measure loading `path` beside it, releasing
    the old one and collecting its garbage: the lateness the loop saw meanwhile."""
    if frozen:
        freeze_runtime_objects()
    old = loader.load(path, "m", 1)  # also TensorFlow's first-load costs, outside the window
    collections = FullCollections()
    stop, lags, took = threading.Event(), [], {}

    def work() -> None:
        lower_thread_priority()
        start = time.perf_counter()
        try:
            new = handing_gil_often(loader.load, path, "m", 1)
            took["load_s"] = time.perf_counter() - start
            old.release()
            gc.collect()
            new.release()
        finally:
            stop.set()

    ticking = asyncio.create_task(_ticker(stop, lags))
    thread = threading.Thread(target=work, name="fovea-loader")
    thread.start()
    while thread.is_alive():
        await asyncio.sleep(0.05)
    await ticking

    def ms(percent: float) -> float:
        return round(float(np.percentile(lags, percent)) * 1000, 2)

    return {"load_s": round(took["load_s"], 2), "ticks": len(lags),
            "p50_ms": ms(50), "p99_ms": ms(99), "max_ms": ms(100),
            "late_total_ms": round(sum(lags) * 1000, 1), "gc_max_ms": round(collections.longest_s * 1000, 1)}  # fmt: skip


def measure(paths: dict[str, str], rounds: int, seed: int) -> dict:
    rng = random.Random(seed)
    rows = []
    for round_ in range(rounds):
        for way in rng.sample(WAYS, len(WAYS)):
            command = [sys.executable, __file__, "--window", way, paths[way]]
            out = subprocess.run(command, env=subprocess_env(), check=True, capture_output=True, text=True)
            rows.append({"round": round_, "way": way, **json.loads(out.stdout.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), flush=True)
    keys = ("p50_ms", "p99_ms", "max_ms", "late_total_ms", "gc_max_ms", "load_s")
    medians = {
        way: {k: statistics.median(r[k] for r in rows if r["way"] == way) for k in keys} for way in WAYS
    }
    return {"rounds": rows, "medians": medians}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version-dir", help="a version exported as now (default: export ResNet50 at 96 px)")
    parser.add_argument(
        "--keras-version-dir", help="the same model exported with the Keras object on the root"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", nargs=2, metavar=("WAY", "PATH"), help=argparse.SUPPRESS)  # one child
    args = parser.parse_args()
    if args.window:
        way, path = args.window
        print(json.dumps(asyncio.run(one_swap(path, frozen=way.endswith("_frozen")))), flush=True)
        return 0
    if bool(args.version_dir) != bool(args.keras_version_dir):
        parser.error("--version-dir and --keras-version-dir go together")
    with tempfile.TemporaryDirectory(prefix="fovea-load-lag-") as tmp:
        now, before = args.version_dir, args.keras_version_dir
        if not now:
            make_models(Path(tmp, "now"), ["resnet50"])
            make_models(Path(tmp, "before"), ["resnet50"], "--keras-format")
            now, before = str(Path(tmp, "now", "resnet50", "1")), str(Path(tmp, "before", "resnet50", "1"))
        paths = {"keras_format": before, "weights_format": now, "weights_format_frozen": now}
        result = measure(paths, args.rounds, args.seed)
    print(json.dumps(result["medians"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
