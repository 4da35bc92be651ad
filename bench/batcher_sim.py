"""The batching and admission policy across model speeds: fovea's real Batcher, built with the
server's default settings, driven by simulated callers in virtual time (no gRPC, no TensorFlow).

    python bench/batcher_sim.py [--batches 300] [--host-curve FIXED_MS,PER_IMAGE_MS] [--check 0.9]
    python bench/batcher_sim.py --summary bench/results/summary.json   # the committed figures

A policy that depends on speed must hold on a 2-core CPU and on a GPU 100x faster. Each cost curve
is "fixed + per image" seconds per batch:

- host: ResNet50 at 96 px on this project's CPU (the figure measured by `bench/run.py`, or pass
  --host-curve with today's);
- host/10 and host/100: the same model 10x and 100x faster;
- gpu: a GPU-like curve, 1.5 ms + 0.15 ms per image (a large fixed cost per call);
- host*4: four times slower.

On each: closed loops of 1, 4, 16 and 64 callers that come back 0.3 to 1.5 ms after their answer (a
gRPC round trip; one in 20 is a straggler, 2-10x later), against the ideal batch's throughput; Poisson arrivals at 50/80/95% of capacity,
whose p99 (the mean over three arrival sequences) is compared with Triton's rule (max_queue_delay 0: start whatever is queued at once); and
4x overload, whose goodput and accepted p99 are reported. Time is virtual (fovea.devtools.virtual_time):
nothing sleeps, so results do not depend on the machine and the same seed gives the same batches.

Prints one JSON object; with --check R exits 1 if any closed loop falls below R of the ideal, any
closed loop is shed, or any open loop's p99 is worse than Triton's rule by more than 5%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(_ROOT / "server"), str(_ROOT / "devtools"), str(_ROOT / "client")]

from fovea.devtools.virtual_time import CostModelSleeper, VirtualExecutor, VirtualTimeLoop  # noqa: E402
from fovea.server.batcher import Batcher  # noqa: E402
from fovea.server.config import Settings  # noqa: E402
from fovea.server.errors import ResourceExhausted  # noqa: E402

# ResNet50 at 96 px, uint8, XLA, on this project's 2-core CPU (bench/NOTES.md): about 14 ms + 7 ms
# per image. The host changes speed by 1.5x between weeks; --host-curve takes today's figure.
HOST_CURVE = (0.014, 0.007)
RTT_S = (0.0003, 0.0015)  # a caller's return delay after its answer: a gRPC round trip on one host
# ... and one return in 20 is a straggler, 2 to 10 times later (the loaded host's scheduler, a GC
# pause): traced on this host at 4 callers, returns took 5 ms and now and then 12-21 ms.
STRAGGLER_SHARE = 0.05
STRAGGLER_FACTOR = (2.0, 10.0)
CALLERS = (1, 4, 16, 64)
LOADS = (0.5, 0.8, 0.95)
OVERLOAD = 4.0
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Curve:
    name: str
    fixed_s: float
    per_image_s: float

    def cost(self, n: int) -> float:
        return self.fixed_s + self.per_image_s * n


def curves(host: tuple[float, float]) -> list[Curve]:
    fixed, per = host
    return [
        Curve("host", fixed, per),
        Curve("host/10", fixed / 10, per / 10),
        Curve("host/100", fixed / 100, per / 100),
        Curve("gpu", 0.0015, 0.00015),
        Curve("host*4", fixed * 4, per * 4),
    ]


def _batcher(
    loop: VirtualTimeLoop, curve: Curve, eager: bool, **overrides
) -> tuple[Batcher, CostModelSleeper]:
    options = Settings().batcher_options()
    if eager:
        options.update(Settings(batch_formation="eager").batcher_options())
    options.update(overrides)
    model = CostModelSleeper(curve.cost, loop)
    workers = options.get("max_in_flight", 1)
    return Batcher(model, executor=VirtualExecutor(loop, workers), clock=loop.clock, **options), model


def _warm(b: Batcher, curve: Curve) -> None:
    """What the server's warm-up does: every batch size it can emit ran once, and seeds the costs."""
    b.seed_costs({n: curve.cost(n) for n in sorted({1, b.max_batch_size})})


def _run(coro_factory: Callable) -> dict:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro_factory(loop))
    finally:
        loop.close()


def return_delay(rng: random.Random) -> float:
    """A caller's delay between its answer and its next request."""
    delay = rng.uniform(*RTT_S)
    if rng.random() < STRAGGLER_SHARE:
        delay *= rng.uniform(*STRAGGLER_FACTOR)
    return delay


def ideal_closed(curve: Curve, callers: int, max_batch: int) -> float:
    """Images/s of the ideal batch: every batch as large as the callers allow (all of them, or a full
    one), so a cycle is one batch plus the slowest of its callers' round trips; the model's speed
    at full batches caps it. Not waiting can beat it where round trips dwarf compute."""
    b = min(callers, max_batch)
    draws = random.Random(0)
    # The mean of the slowest of b round trips, by sampling (stragglers included).
    slowest = float(np.mean([max(return_delay(draws) for _ in range(b)) for _ in range(2000)]))
    return min(max_batch / curve.cost(max_batch), callers / (curve.cost(b) + slowest))


def closed(curve: Curve, callers: int, batches: int, eager: bool, seed: int = 0) -> dict:
    async def main(loop: VirtualTimeLoop) -> dict:
        b, model = _batcher(loop, curve, eager)
        seconds = batches * curve.cost(b.max_batch_size)
        _warm(b, curve)
        rng = random.Random(seed)
        done = shed = 0
        start = loop.time()
        warm_until, stop = start + seconds * 0.2, start + seconds
        latencies: list[float] = []

        async def caller() -> None:
            nonlocal done, shed
            while loop.time() < stop:
                sent = loop.time()
                try:
                    with b.admit(1) as place:
                        await b.submit([np.zeros(1)], place=place)
                except ResourceExhausted:
                    shed += 1
                    await asyncio.sleep(curve.cost(b.max_batch_size))  # a client's backoff
                    continue
                if sent >= warm_until:
                    done += 1
                    latencies.append(loop.time() - sent)
                await asyncio.sleep(return_delay(rng))

        await asyncio.gather(*(caller() for _ in range(callers)))
        await b.close()
        rate = done / (stop - warm_until)
        ideal = ideal_closed(curve, callers, b.max_batch_size)
        sizes = model.sizes[2:]
        return {
            "images_per_s": round(rate, 1),
            "ideal_images_per_s": round(ideal, 1),
            "ratio": round(rate / ideal, 3),
            "shed": shed,
            "mean_batch": round(float(np.mean(sizes)), 2) if sizes else 0.0,
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 3) if latencies else None,
        }

    return _run(main)


def open_loop(curve: Curve, load: float, batches: int, eager: bool, seed: int = 0, deadline_s=None) -> dict:
    async def main(loop: VirtualTimeLoop) -> dict:
        b, _ = _batcher(loop, curve, eager)
        seconds = batches * curve.cost(b.max_batch_size)
        _warm(b, curve)
        capacity = b.max_batch_size / curve.cost(b.max_batch_size)
        rng = np.random.default_rng(seed)
        latencies: list[float] = []
        shed = offered = 0
        start = loop.time()
        warm_until, stop = start + seconds * 0.2, start + seconds

        async def one(due: float) -> None:
            nonlocal shed
            deadline = None if deadline_s is None else due + deadline_s
            try:
                with b.admit(1, deadline) as place:
                    await b.submit([np.zeros(1)], deadline, place=place)
            except ResourceExhausted:
                shed += due >= warm_until
                return
            except Exception:
                return  # expired in the queue: not goodput
            if due >= warm_until:
                latencies.append(loop.time() - due)

        # Each arrival is a timer, so arrivals due while the loop was blocked (a batch computed
        # inline) all enter together, as requests queued in a socket do.
        tasks: list[asyncio.Future] = []
        due = start
        while (due := due + rng.exponential(1 / (capacity * load))) < stop:
            offered += due >= warm_until
            loop.call_at(due, lambda d=due: tasks.append(asyncio.ensure_future(one(d))))
        await asyncio.sleep(stop - loop.time())
        await asyncio.gather(*tasks)
        await b.close()
        lat = np.array(latencies) * 1000
        window = stop - warm_until
        return {
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "batch_ms": round(1000 * curve.cost(b.max_batch_size), 3),
            "goodput_over_capacity": round(len(lat) / window / capacity, 3),
            "shed_share": round(shed / max(offered, 1), 3),
        }

    return _run(main)


def simulate(batches: int, host: tuple[float, float]) -> dict:
    rows = []
    for curve in curves(host):
        for callers in CALLERS:
            ours, eager = closed(curve, callers, batches, False), closed(curve, callers, batches, True)
            rows.append(
                {
                    "curve": curve.name,
                    "mode": "closed",
                    "level": callers,
                    **ours,
                    "eager_ratio": eager["ratio"],
                }
            )
        for load in (*LOADS, OVERLOAD):
            # Three arrival sequences, the same for both rules: one sequence's p99 rests on a few dozen
            # requests, and a single different batch early on reshuffles every later one.
            ours = [open_loop(curve, load, batches, False, seed) for seed in SEEDS]
            eager = [open_loop(curve, load, batches, True, seed) for seed in SEEDS]
            mean = {k: round(float(np.mean([r[k] for r in ours])), 3) for k in ours[0]}
            eager_p99 = float(np.mean([r["p99_ms"] for r in eager]))
            rows.append(
                {
                    "curve": curve.name,
                    "mode": "open",
                    "level": load,
                    **mean,
                    "eager_p99_ms": round(eager_p99, 3),
                    "p99_over_eager": round(mean["p99_ms"] / eager_p99, 3),
                }
            )
    return {
        "full_batch_times_per_run": batches,
        "rtt_s": RTT_S,
        "stragglers": {"share": STRAGGLER_SHARE, "factor": STRAGGLER_FACTOR},
        "host_curve_s": host,
        "rows": rows,
    }


def failures(result: dict, minimum: float) -> list[str]:
    problems = []
    for row in result["rows"]:
        where = f"{row['curve']} {row['mode']} {row['level']}"
        if row["mode"] == "closed":
            if row["ratio"] < minimum:
                problems.append(f"{where}: {row['ratio']} of the ideal batch's throughput (< {minimum})")
            if row["shed"]:
                problems.append(f"{where}: a closed loop was shed {row['shed']} times")
        elif row["level"] <= 1 and row["p99_over_eager"] > 1.05:
            problems.append(f"{where}: p99 {row['p99_ms']} ms, Triton's rule {row['eager_p99_ms']} ms")
        elif row["level"] > 1 and row["goodput_over_capacity"] < minimum:
            problems.append(f"{where}: goodput {row['goodput_over_capacity']} of capacity (< {minimum})")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batches", type=int, default=300, help="length of each run, in full-batch compute times"
    )
    parser.add_argument("--host-curve", default=None, help="FIXED_MS,PER_IMAGE_MS of today's host")
    parser.add_argument("--check", type=float, default=None, help="fail below this share of the ideal")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument(
        "--summary",
        type=Path,
        default=None,
        help="merge the rows into this summary.json under the key 'sim' (bench/results/summary.json)",
    )
    args = parser.parse_args()
    host = HOST_CURVE
    if args.host_curve:
        fixed_ms, per_ms = (float(v) for v in args.host_curve.split(","))
        host = (fixed_ms / 1000, per_ms / 1000)
    result = simulate(args.batches, host)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    if args.summary:
        summary = json.loads(args.summary.read_text()) if args.summary.exists() else {}
        summary["sim"] = result
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    print(text)
    if args.check is not None:
        problems = failures(result, args.check)
        for p in problems:
            print("batcher_sim:", p, file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
