"""Where a tiny model's call goes at concurrency 1: the breakdown behind the per-call overhead.

    python bench/overhead.py --model <version folder> [--seconds 3]

Measures, in one process and one after the other (p50 of single calls):
- the exported signature at batch 1, and the XLA-compiled one (what the loader serves when faster);
- LoadedModel.predict (tf.constant in, .numpy() out, the served function);
- Batcher.submit around it, with the thread hop to a worker and computed on the loop;
- a gRPC round trip to a fovea.v1 ClassifierService that answers a canned response at once (what
  grpc and protobuf cost with no serving at all), driven by bench/loadgen.py like the real one: on
  grpc.aio (what fovea uses) and on the thread-pool grpc server (the alternative).
Prints one JSON object; bench/NOTES.md has the table from a run. With --echo-server it only serves
the grpc.aio echo, in its own process (bench/interleaved.py --overhead interleaves it with fovea).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / d) for d in ("client", "server", "trainer")]
from fovea import contract  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from run import run_loadgen  # noqa: E402


def p50_ms(call, seconds: float) -> float:
    import numpy as np

    for _ in range(20):
        call()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.percentile(np.array(times) * 1000, 50))


async def batcher_p50_ms(predict, image, inline: bool, seconds: float) -> float:
    import numpy as np
    from fovea.server.batcher import Batcher

    b = Batcher(predict, max_batch_size=32, inline_below_s=0.001 if inline else 0.0)
    for _ in range(20):
        await b.submit([image])
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        await b.submit([image])
        times.append(time.perf_counter() - t0)
    await b.close()
    return float(np.percentile(np.array(times) * 1000, 50))


def _echo_servicer():
    from fovea.v1 import classifier_pb2 as pb
    from fovea.v1 import classifier_pb2_grpc

    def answer() -> pb.PredictResponse:
        response = pb.PredictResponse(model_spec=pb.ModelSpec(name="echo", version=1))
        response.predictions.add().top.add(index=0, label="class_0", score=1.0)
        return response

    class AioEcho(classifier_pb2_grpc.ClassifierServiceServicer):
        async def Predict(self, request, context):
            return answer()

    class SyncEcho(classifier_pb2_grpc.ClassifierServiceServicer):
        def Predict(self, request, context):
            return answer()

    return AioEcho(), SyncEcho(), classifier_pb2_grpc.add_ClassifierServiceServicer_to_server


def echo_server(kind: str) -> tuple[int, Callable[[], None]]:
    """A ClassifierService whose Predict answers a canned top-1 at once: grpc.aio on its own loop
    thread, or the thread-pool grpc server (the alternative to weigh)."""
    import concurrent.futures

    import grpc

    aio_echo, sync_echo, add = _echo_servicer()
    if kind == "sync":
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
        add(sync_echo, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        return port, lambda: server.stop(0)

    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict = {}

    async def serve() -> None:
        server = grpc.aio.server()
        add(aio_echo, server)
        state["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        state["server"] = server
        started.set()
        await server.wait_for_termination()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    started.wait(30)

    def stop() -> None:
        # grpc.aio on a second thread's loop sometimes never finishes stopping; the measurement is
        # taken by then and the thread is a daemon, so a stop that hangs is left behind, not fatal.
        future = asyncio.run_coroutine_threadsafe(state["server"].stop(0), loop)
        with contextlib.suppress(concurrent.futures.TimeoutError):  # not the builtin before 3.11
            future.result(10)

    return state["port"], stop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a published version folder")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--echo-server",
        action="store_true",
        help="only serve the grpc.aio echo: print its port, answer until stdin closes (bench/interleaved.py)",
    )
    args = parser.parse_args()
    if args.echo_server:
        port, stop = echo_server("aio")
        print(port, flush=True)
        sys.stdin.read()
        stop()
        return 0
    if not args.model:
        parser.error("--model is required")

    import numpy as np
    import tensorflow as tf
    from fovea.server import loader

    model = loader.load(args.model, "tiny", 1, xla_sizes=(1,))
    model.warm_up([1])
    model.wait_compiled()
    h, w = model.metadata.input_height, model.metadata.input_width
    image = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    batch = image[None]
    tensor = tf.constant(batch)
    signature = model._signature
    out: dict = {"compiled_sizes": model.compiled_sizes}
    out["signature_b1_ms"] = p50_ms(lambda: signature(images=tensor)[contract.OUTPUT].numpy(), args.seconds)
    out["xla_b1_ms"] = p50_ms(lambda: model.predict_compiled(batch), args.seconds)
    out["predict_ms"] = p50_ms(lambda: model.predict(batch), args.seconds)
    out["batcher_thread_ms"] = asyncio.run(batcher_p50_ms(model.predict, image, False, args.seconds))
    out["batcher_inline_ms"] = asyncio.run(batcher_p50_ms(model.predict, image, True, args.seconds))

    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "img.npy"
        np.save(payload, image)
        for kind in ("aio", "sync"):
            port, stop = echo_server(kind)
            result = run_loadgen(
                f"127.0.0.1:{port}",
                payload,
                "--concurrency",
                "1",
                "--warmup",
                "1",
                "--duration",
                str(args.seconds),
            )
            stop()
            out[f"grpc_{kind}_echo_ms"] = result["p50_ms"]
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
