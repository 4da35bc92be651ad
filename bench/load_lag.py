"""Event-loop lag while a version loads beside it, with and without the GIL handed over often.

    python bench/load_lag.py                      # exports ResNet50 at 96 px, 3 rounds (about 2 minutes)
    python bench/load_lag.py --version-dir DIR    # an exported version folder instead

A hot swap loads the new SavedModel on the loader thread while the event loop serves. The load is
mostly Python, so it holds the GIL, and the loop (and the batch worker) wait for it: CPython lets a
waiting thread ask for the GIL only after its switch interval (5 ms by default). This measures what the
serving side sees: an asyncio task sleeping 1 ms in a loop records how late each wake-up is, while the
version loads on a thread at the lowest priority, as the server's loader does. Each round loads once
with CPython's default interval and once through `background.handing_gil_often` (the server's way),
in a shuffled order; it prints every load and the medians over rounds of p50, p99 and max lateness and
of the load's duration. One warm-up load first (TensorFlow's start, the files in the page cache).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from fovea.server import loader  # noqa: E402
from fovea.server.background import handing_gil_often, lower_thread_priority  # noqa: E402
from run import make_models  # noqa: E402  (puts the repository's packages on the path)

WAYS = ("default", "handed_often")


async def _ticker(stop: threading.Event, lags: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - start - 0.001)


async def one_load(path: str, way: str) -> dict:
    stop, lags, took = threading.Event(), [], {}

    def work() -> None:
        lower_thread_priority()
        start = time.perf_counter()
        try:
            if way == "handed_often":
                model = handing_gil_often(loader.load, path, "m", 1)
            else:
                model = loader.load(path, "m", 1)
            took["load_s"] = time.perf_counter() - start
            model.release()
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

    return {"way": way, "load_s": round(took["load_s"], 2), "ticks": len(lags),
            "p50_ms": ms(50), "p99_ms": ms(99), "max_ms": ms(100)}  # fmt: skip


async def measure(path: str, rounds: int, seed: int) -> dict:
    rng = random.Random(seed)
    loader.load(path, "m", 1).release()
    rows = []
    for round_ in range(rounds):
        for way in rng.sample(WAYS, len(WAYS)):
            row = {"round": round_, **await one_load(path, way)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    medians = {
        way: {k: statistics.median(r[k] for r in rows if r["way"] == way) for k in ("p50_ms", "p99_ms", "max_ms", "load_s")}
        for way in WAYS
    }  # fmt: skip
    return {"rounds": rows, "medians": medians}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--version-dir", help="an exported version folder (default: export ResNet50 at 96 px)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fovea-load-lag-") as tmp:
        path = args.version_dir
        if not path:
            make_models(Path(tmp), ["resnet50"])
            path = str(Path(tmp) / "resnet50" / "1")
        result = asyncio.run(measure(path, args.rounds, args.seed))
    print(json.dumps(result["medians"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
