"""The REST port against hostile clients, at the size the REST issue measured, with the figures printed.

    python bench/rest_hostile.py                # 80 slow clients for 60 s, an 8 MB gzip bomb
    python bench/rest_hostile.py --seconds 15   # shorter, for a look
    python bench/rest_hostile.py --costly-only  # only part 3, gRPC health polled every 20 ms

A `fovea serve` with its defaults (64 MiB messages, 64 concurrent RPCs, --http-body-timeout 10 s,
--no-xla) serving the tiny CNN at 32 px (the attacks cost the same whatever the model), and:
1. `--clients` connections each sending `POST /v2/models/tiny/infer` with `Content-Length: 1000000`
   and then a byte every 2 s (reconnecting when answered), for `--seconds`; every 5 s a normal JSON
   REST infer and REST readiness are timed.
2. A gzip body of `--gzip-mb` MB (zeros: it inflates about 1000x, far past the 64 MiB limit), sent
   `--bombs` times; the server's CPU for them is read from /proc.
3. The requests whose cost followed what the client wrote: 32 images with 300,000 repeated outputs,
   16 MiB of JSON nested 400 deep, BYTES data holding a number (4000000000, 1e12), a 16 MiB UINT8
   JSON tensor (valid JSON, refused for its shape), each followed by the max gRPC health latency
   while it ran (the issue's requirement: within 100 ms throughout). `--costly-only` runs just these,
   `--repeat` times, polling health every 20 ms.
Throughout, a gRPC Predict every 0.2 s and a gRPC health check every 50 ms are timed. Nothing is
asserted: it prints what it saw. On a shared machine the latencies include everyone else's load.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# run.py puts client/, server/, trainer/ and devtools/ on sys.path when imported.
from run import log, make_models, start_server, stop_server  # noqa: E402

SIZE = 32  # the tiny model's input


def grpc_predict_latencies(target: str, stop: threading.Event) -> list[tuple[float, str]]:
    """(seconds, code) of a fovea.v1 Predict every 0.2 s until `stop` (the list fills meanwhile)."""
    import numpy as np
    from fovea.client import Client, FoveaError, RetryPolicy
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(png, format="PNG")
    seen: list[tuple[float, str]] = []

    def run() -> None:
        with Client(target, retry_policy=RetryPolicy(max_attempts=1)) as client:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    client.predict(png.getvalue(), timeout=30)
                    code = "OK"
                except FoveaError as exc:
                    code = exc.code
                seen.append((time.perf_counter() - start, code))
                stop.wait(0.2)

    threading.Thread(target=run, daemon=True).start()
    return seen


def summary(latencies: list[float]) -> str:
    if not latencies:
        return "none"
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"{len(ordered)} calls, p50 {statistics.median(ordered) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {ordered[-1] * 1000:.0f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the slow clients are held")
    parser.add_argument("--clients", type=int, default=80)
    parser.add_argument("--gzip-mb", type=float, default=8.0, help="size of the compressed bomb")
    parser.add_argument("--bombs", type=int, default=3)
    parser.add_argument("--costly-only", action="store_true", help="only the costly requests (part 3)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the costly requests")
    args = parser.parse_args()

    from fovea.devtools import hostile_http as hostile

    with tempfile.TemporaryDirectory() as work:
        models = Path(work) / "models"
        log("exporting the tiny CNN at 32 px")
        make_models(models, ["tiny"])
        server = start_server(models, ["--no-xla", "--log-level", "WARNING"])
        try:
            port, path = server.http_port, "/v2/models/tiny/infer"
            infer = json.dumps(
                {
                    "inputs": [
                        {
                            "name": "images",
                            "datatype": "UINT8",
                            "shape": [1, SIZE, SIZE, 3],
                            "data": [0] * (SIZE * SIZE * 3),
                        }
                    ]
                }
            ).encode()
            stop = threading.Event()
            if args.costly_only:
                health = hostile.health_latencies(server.target, stop, every_s=0.02)
                time.sleep(2)
                log(f"idle: health {summary(health)}")
                worst: dict[str, float] = {}
                for _ in range(args.repeat):
                    for kind, seconds in costly(port, [], health).items():
                        worst[kind] = max(seconds, worst.get(kind, 0.0))
                for kind, seconds in worst.items():
                    log(f"max gRPC health latency during {kind}: {seconds * 1000:.0f} ms")
                log(f"server peak RSS {server.peak_rss_mb():.0f} MB")
                stop.set()
                return 0
            predicts = grpc_predict_latencies(server.target, stop)
            health = hostile.health_latencies(server.target, stop, every_s=0.05)
            time.sleep(2)
            idle_predicts, idle_health = len(predicts), len(health)
            log(f"idle: gRPC Predict {summary([t for t, _ in predicts])}; health {summary(health)}")

            log(f"{args.clients} slow-body clients for {args.seconds:.0f} s; a normal REST infer every 5 s")
            samples = []
            with hostile.slow_bodies(port, args.clients, path, declared=1_000_000, interval_s=2.0) as slow:
                start = time.monotonic()
                while (elapsed := time.monotonic() - start) < args.seconds:
                    time.sleep(min(5.0, max(0.0, args.seconds - elapsed)))
                    status, seconds = hostile.timed_post(port, path, infer)
                    ready_status, ready_s = hostile.timed_get(port, "/v2/health/ready")
                    samples.append((time.monotonic() - start, status, seconds))
                    log(
                        f"  t={time.monotonic() - start:4.0f} s: REST infer {status} in {seconds * 1000:.0f} ms; "
                        f"ready {ready_status} in {ready_s * 1000:.0f} ms; slow clients connected so far "
                        f"{slow.connected}, answered {len(slow.answers)}"
                    )
            slow_predicts = [t for t, _ in predicts[idle_predicts:]]
            slow_health = health[idle_health:]
            codes = sorted({c for _, c in predicts[idle_predicts:]})
            log(
                f"slow clients: {slow.connected} connections, answers {dict(sorted(Counter(slow.answers).items()))}; "
                f"REST infers {[s for _, s, _ in samples]}, slowest {max(t for *_, t in samples) * 1000:.0f} ms"
            )
            log(f"  meanwhile gRPC Predict {summary(slow_predicts)} {codes}; health {summary(slow_health)}")

            bomb = hostile.gzip_bomb(int(args.gzip_mb * 1000 * 2**20 / 1.03))  # ~1030:1 for zeros
            mark_p, mark_h = len(predicts), len(health)
            for i in range(args.bombs):
                before = server.cpu_seconds()
                start = time.perf_counter()
                status, answer = hostile.post(port, path, bomb, {"Content-Encoding": "gzip"})
                wall = time.perf_counter() - start
                cpu = server.cpu_seconds() - before
                log(
                    f"gzip bomb {i + 1}: {len(bomb) / 1e6:.1f} MB compressed: HTTP {status} after {wall:.2f} s, "
                    f"{cpu:.2f} s of server CPU; {answer[:110].decode(errors='replace')}"
                )
            time.sleep(1)
            bomb_codes = sorted({c for _, c in predicts[mark_p:]})
            log(f"  meanwhile gRPC Predict {summary([t for t, _ in predicts[mark_p:]])} {bomb_codes}")
            log(f"  meanwhile health {summary(health[mark_h:])}")
            costly(port, predicts, health)
            log(f"server peak RSS {server.peak_rss_mb():.0f} MB")
            stop.set()
        finally:
            stop_server(server)
    return 0


def costly(port: int, predicts: list[tuple[float, str]], health: list[float]) -> dict[str, float]:
    """The requests whose work followed what the client sent, at the size the JSON limit admits
    (16 MiB of JSON at the default 64 MiB messages), each timed with the gRPC calls meanwhile;
    the max health latency during each is returned."""
    from fovea.devtools import hostile_http as hostile

    json_cap = 16 * 2**20
    bytes_input = {"name": "image_bytes", "datatype": "BYTES", "shape": [1]}
    cases = {
        "32 images + repeated outputs": {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [32, SIZE, SIZE, 3],
                    "data": [0] * (32 * SIZE**3 * 3 // SIZE),
                }
            ],
            "outputs": [{"name": "probabilities"}] * 300_000,
        },
        "16 MiB nested 400 deep": None,
        "BYTES data [4000000000]": {"inputs": [{**bytes_input, "data": [4_000_000_000]}]},
        "BYTES data [1e12]": {"inputs": [{**bytes_input, "data": [1e12]}]},
        # 16 MiB of "7, " is 5.6M pixels: valid UINT8 JSON, refused for its shape once parsed.
        "16 MiB UINT8 JSON tensor": {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [1, SIZE, SIZE, 3],
                    "data": [7] * (json_cap // 3 - 64),
                }
            ]
        },
    }
    worst: dict[str, float] = {}
    for kind, value in cases.items():
        if value is None:  # [[[...0...]]] 400 deep, repeated to fill the JSON limit
            chunk = "[" * 400 + "0" + "]" * 400
            data = '{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1], "data": ['
            data = (data + ",".join([chunk] * (json_cap // (len(chunk) + 1) - 1)) + "]}]}").encode()
        else:
            data = json.dumps(value).encode()
        path = "/v2/models/tiny-encoded/infer" if kind.startswith("BYTES") else "/v2/models/tiny/infer"
        mark_p, mark_h = len(predicts), len(health)
        start = time.perf_counter()
        status, answer = hostile.post(port, path, data)
        wall = time.perf_counter() - start
        time.sleep(0.5)
        log(
            f"{kind} ({len(data) / 1e6:.1f} MB): HTTP {status} in {wall:.2f} s: "
            f"{answer[:100].decode(errors='replace')}"
        )
        log(
            f"  meanwhile gRPC Predict {summary([t for t, _ in predicts[mark_p:]])}; health {summary(health[mark_h:])}"
        )
        worst[kind] = max(health[mark_h:], default=0.0)
    return worst


if __name__ == "__main__":
    sys.exit(main())
