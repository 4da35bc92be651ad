"""Load generator for one benchmark point: a separate process, so its CPU is measured on its own.

Sends single-image requests over grpc.aio, serialized once and sent as bytes, with the answers left
unparsed (only their status counts): the least client CPU there is, which matters here because the
load generator shares the server's two cores. In a closed
loop (N callers, each sending the next request as soon as the last returns) or an open loop (Poisson
arrivals at a given mean rate, whatever the server does). `--protocol fovea` sends fovea.v1 Predict;
`--protocol kserve` sends KServe v2 ModelInfer (uint8 [1, H, W, 3] in raw_input_contents, through
tritonclient's generated stubs), which is how bench/peers.py drives PyTriton and MLServer; an encoded
payload goes as BYTES `image_bytes` [1, 1] (its raw form: a 4-byte length, then the bytes), what
fovea's `MODEL-encoded` and a peer's bytes model take. With --cpu-of PID, the CPU seconds of that
process tree over the measuring window are reported too (bench/proc_cpu.py).
Prints one JSON object on stdout.

The open loop also counts answers by status code, and with --probe-threshold-ms measures recovery:
once sending stops, one probe request after another until one answers within the threshold. With
--timeline FILE it writes every request (when it was due, on time.monotonic(), its latency and status)
for per-second figures; SIGTERM ends its sending early (bench/hot_swap.py stops it once its swaps are done).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import proc_cpu  # beside this script, so on its path
from fovea.contract import INPUT_BYTES, INPUT_IMAGES, OUTPUT
from fovea.v1 import classifier_pb2

PREDICT = "/" + classifier_pb2.DESCRIPTOR.services_by_name["ClassifierService"].full_name + "/Predict"


def _kserve(payload: Path, model: str):
    """A KServe v2 ModelInfer request for one image (uint8 pixels from a .npy, else encoded bytes),
    and the method path it goes to."""
    from tritonclient.grpc import service_pb2

    if payload.suffix == ".npy":
        array = np.load(payload)
        name, datatype, shape, raw = INPUT_IMAGES, "UINT8", [1, *array.shape], array.tobytes()
    else:
        data = payload.read_bytes()
        name, datatype, shape, raw = INPUT_BYTES, "BYTES", [1, 1], struct.pack("<I", len(data)) + data
    request = service_pb2.ModelInferRequest(
        model_name=model,
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)],
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=OUTPUT)],
        raw_input_contents=[raw],
    )
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    return request, f"/{service}/ModelInfer"


def _request(payload: Path, model: str) -> classifier_pb2.PredictRequest:
    if payload.suffix == ".npy":
        array = np.load(payload)
        image = classifier_pb2.Image(
            raw=classifier_pb2.RawImage(
                dtype=classifier_pb2.DATA_TYPE_UINT8, shape=list(array.shape), data=array.tobytes()
            )
        )
    else:
        image = classifier_pb2.Image(encoded=payload.read_bytes())
    return classifier_pb2.PredictRequest(
        images=[image], top_k=1, model_spec=classifier_pb2.ModelSpec(name=model)
    )


async def _closed(stub, request, concurrency: int, warmup: float, duration: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    async def caller() -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            try:
                await stub(request, timeout=30)
            except grpc.aio.AioRpcError:
                errors += t0 >= measure_from
                continue
            if t0 >= measure_from:
                latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, errors


async def _open(
    stub,
    request,
    rate: float,
    warmup: float,
    duration: float,
    deadline: float,
    probe_threshold_ms: float,
    timeline: list[tuple[float, float, str]] | None = None,
) -> tuple[list[float], int, dict]:
    latencies: list[float] = []
    codes: Counter = Counter()
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    to_monotonic = time.monotonic() - time.perf_counter()  # the same clock on Linux; exact elsewhere
    if timeline is not None:
        print("sending", file=sys.stderr, flush=True)  # a caller timing its own events waits for this
    # Poisson arrivals (exponential gaps, a fixed seed so runs compare): the bursts real traffic has,
    # which a fixed rate would hide.
    rng = np.random.default_rng(0)
    tasks = []

    async def one(t0: float) -> None:
        nonlocal errors
        try:
            await stub(request, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            if timeline is not None:
                timeline.append((t0 + to_monotonic, time.perf_counter() - t0, exc.code().name))
            if t0 >= measure_from:
                errors += 1
                codes[exc.code().name] += 1
            return
        if timeline is not None:
            timeline.append((t0 + to_monotonic, time.perf_counter() - t0, "OK"))
        if t0 >= measure_from:
            codes["OK"] += 1
            latencies.append(time.perf_counter() - t0)

    due = start
    while True:
        due += rng.exponential(1.0 / rate)
        if due >= stop_at or stopped.is_set():
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        # Latency is counted from when the request was due, so a late sender does not hide queueing.
        tasks.append(asyncio.create_task(one(due)))
    sending_ended = time.perf_counter()
    stop_at = min(stop_at, sending_ended)  # an early stop (SIGTERM) is not lateness
    extra = {"codes": dict(codes), "late_s": max(0.0, sending_ended - stop_at)}
    if probe_threshold_ms > 0:
        # Recovery: how long after the overload ends until a lone request is fast again.
        while True:
            t0 = time.perf_counter()
            try:
                await stub(request, timeout=deadline)
                ok = (time.perf_counter() - t0) * 1000 <= probe_threshold_ms
            except grpc.aio.AioRpcError:
                ok = False
            if ok or t0 - sending_ended > 120:
                extra["recovery_s"] = time.perf_counter() - sending_ended if ok else None
                break
            await asyncio.sleep(0.02)
    await asyncio.gather(*tasks)
    extra["codes"] = dict(codes)
    return latencies, errors, extra


async def _first_call(stub, request, ready_timeout: float) -> None:
    """One call that succeeds, retried while the server is still starting (peers have no health)."""
    give_up = time.monotonic() + ready_timeout
    while True:
        try:
            await stub(request, timeout=60)
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(0.5)


async def _window_cpu(pids: list[int], warmup: float, duration: float) -> dict:
    """The CPU the process trees of `pids` use over the measuring window, read at its two ends."""
    await asyncio.sleep(warmup)
    t0, cpu0 = time.perf_counter(), proc_cpu.tree_cpu_seconds(pids)
    await asyncio.sleep(duration)
    t1, cpu1 = time.perf_counter(), proc_cpu.tree_cpu_seconds(pids)
    return {
        "server_cpu_s": cpu1 - cpu0,
        "server_cpu_window_s": t1 - t0,
        "server_cores": (cpu1 - cpu0) / (t1 - t0),
    }


async def main_async(args: argparse.Namespace) -> dict:
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        if args.protocol == "kserve":
            message, path = _kserve(args.payload, args.model)
        else:
            message, path = _request(args.payload, args.model), PREDICT
        # No serializers: the request goes as these bytes, the answer comes back as bytes.
        stub = channel.unary_unary(path, _registered_method=True)  # as generated stubs do: faster calls
        request = message.SerializeToString()
        await _first_call(stub, request, args.ready_timeout)  # connect before the clock starts
        t0 = time.perf_counter()
        extra: dict = {}
        cpu = (
            asyncio.create_task(_window_cpu(args.cpu_of, args.warmup, args.duration)) if args.cpu_of else None
        )
        if args.mode == "closed":
            latencies, errors = await _closed(stub, request, args.concurrency, args.warmup, args.duration)
        else:
            timeline: list[tuple[float, float, str]] | None = [] if args.timeline else None
            latencies, errors, extra = await _open(
                stub,
                request,
                args.rate,
                args.warmup,
                args.duration,
                args.deadline,
                args.probe_threshold_ms,
                timeline,
            )
            if args.timeline:
                due, latency, code = zip(*timeline, strict=True) if timeline else ((), (), ())
                args.timeline.write_text(json.dumps({"due": due, "latency_s": latency, "code": code}))
        wall = time.perf_counter() - t0 - args.warmup
        if cpu is not None:
            extra.update(await cpu)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": wall,
        "throughput": len(latencies) / wall if wall > 0 else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p90_ms": float(np.percentile(lat, 90)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "loadgen_cpu_s": usage.ru_utime + usage.ru_stime,
        **extra,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--payload", type=Path, required=True, help=".npy (uint8 pixels) or an encoded image")
    parser.add_argument("--protocol", choices=["fovea", "kserve"], default="fovea")
    parser.add_argument("--model", default="", help="model name (fovea: empty for the only one served)")
    parser.add_argument("--ready-timeout", type=float, default=0.0, help="retry the first call this long")
    parser.add_argument("--mode", choices=["closed", "open"], default="closed")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument(
        "--rate", type=float, default=10.0, help="mean requests per second (open loop, Poisson)"
    )
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds, per request (open loop)")
    parser.add_argument(
        "--probe-threshold-ms", type=float, default=0.0, help="measure recovery after an open loop (0: off)"
    )
    parser.add_argument(
        "--cpu-of",
        type=lambda text: [int(p) for p in text.split(",")],
        default=[],
        help="comma-separated PIDs: report their process trees' CPU over the measuring window",
    )
    parser.add_argument(
        "--timeline",
        type=Path,
        help="open loop: write every request (due, latency, status) to this JSON file",
    )
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    json.dump(asyncio.run(main_async(args)), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
