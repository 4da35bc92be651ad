"""The batch-formation policy alone: fovea's real Batcher with a model that sleeps like ResNet50 at
96 px on this CPU (14 ms + 7 ms per image), in one process, no gRPC and no TensorFlow.

    python bench/batcher_sim.py [--seconds 6]

Closed loops (callers come back 0 to 1.5 ms after their answer, like a client over gRPC) and Poisson
open loops at 50/80/95% of the model's capacity at batch 32, each with the default wait
(--batch-wait-fraction 0.1) and without it (0). A sleeping model needs no CPU, so this isolates the
policy from whatever else runs on the machine better than the full benchmark can.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "server")]

from fovea.server.batcher import Batcher  # noqa: E402

FIXED_S, PER_IMAGE_S = 0.014, 0.007


def model(batch: np.ndarray) -> np.ndarray:
    time.sleep(FIXED_S + PER_IMAGE_S * len(batch))
    return batch


async def closed(wait_fraction: float, callers: int, seconds: float) -> dict:
    b = Batcher(model, max_batch_size=32, wait_fraction=wait_fraction)
    done = 0
    stop = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await b.submit([np.zeros(1)])
            done += 1
            await asyncio.sleep(0.0005 * (i % 4))

    await asyncio.gather(*(caller(i) for i in range(callers)))
    await b.close()
    batch = min(callers, 32)
    return {"images_per_s": done / seconds, "model_at_batch": batch / (FIXED_S + PER_IMAGE_S * batch)}


async def open_loop(wait_fraction: float, rate: float, seconds: float, seed: int = 0) -> dict:
    b = Batcher(model, max_batch_size=32, wait_fraction=wait_fraction)
    rng = np.random.default_rng(seed)
    latencies: list[float] = []

    async def one(due: float) -> None:
        await b.submit([np.zeros(1)])
        latencies.append(time.perf_counter() - due)

    tasks = []
    start = due = time.perf_counter()
    while (due := due + rng.exponential(1 / rate)) < start + seconds:
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    await b.close()
    lat = np.array(latencies[len(latencies) // 5 :]) * 1000  # the first fifth warms up
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


async def main_async(seconds: float) -> dict:
    capacity = 32 / (FIXED_S + 32 * PER_IMAGE_S)
    out: dict = {"capacity_images_per_s": capacity, "closed": {}, "open": {}}
    for c in (1, 4, 16, 64):
        out["closed"][c] = {str(wf): await closed(wf, c, seconds) for wf in (0.1, 0.0)}
    for fraction in (0.5, 0.8, 0.95):
        out["open"][fraction] = {
            str(wf): await open_loop(wf, capacity * fraction, seconds) for wf in (0.1, 0.0)
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    json.dump(asyncio.run(main_async(args.seconds)), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
