"""Fuzz a real `fovea serve` process with malformed requests: every answer is a bounded, counted status.

At least 10,000 requests per run: random and mutated images of every format, bombs of every format
(oversized GIF frames included), bad raw tensors, bad model names and versions, malformed wire bytes
and oversize messages. The server must answer each with OK (a mutated image that still decodes),
INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED or OUT_OF_RANGE; count every one it handled in
fovea_requests_total; keep its peak RSS growth within what docs/memory.md allows its settings; stay
SERVING; and give a valid request the same answer before and after. Set FOVEA_FUZZ_SEED to vary the
run (the seed is printed). Oversize messages are refused by gRPC before any handler, so they are not
counted.
"""

from __future__ import annotations

import io
import os
import random
import re
import struct
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the fuzz test needs the server extra")

from _bombs import constant_gif, header_only, stub_gif, zeros_png
from _models import export_tiny
from _serving import subprocess_env
from fovea.devtools.server_process import ServerProcess
from fovea.v1 import classifier_pb2 as pb
from PIL import Image

REQUESTS = int(os.environ.get("FOVEA_FUZZ_REQUESTS", "10000"))
SEED = int(os.environ.get("FOVEA_FUZZ_SEED", "20251125"))
SIZE = 32
MAX_PIXELS = 4_000_000
MAX_MESSAGE_MB = 4
MAX_IMAGES = 16
WINDOW = 48  # RPCs in flight at once


def rss_growth_bound_mib(**overrides: int) -> float:
    """Peak RSS growth over the warm, idle server that docs/memory.md's formula allows these settings
    (and the `overrides` of another fuzz test's server)."""
    from fovea.server import config, memory

    settings = config.Settings(
        max_pixels=MAX_PIXELS,
        max_message_mb=MAX_MESSAGE_MB,
        max_images_per_request=MAX_IMAGES,
        max_batch_size=8,
        **overrides,
    )
    return memory.budget(settings, 0, 0, input_size=(SIZE, SIZE)).total / 2**20


ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE"}
PREDICT = "/fovea.v1.ClassifierService/Predict"
METADATA = "/fovea.v1.ClassifierService/GetModelMetadata"
V2_INFER = "/inference.GRPCInferenceService/ModelInfer"
TFS_PREDICT = "/tensorflow.serving.PredictionService/Predict"


@dataclass
class Case:
    kind: str
    method: str  # the RPC path
    body: bytes  # the serialized request, sent as raw bytes
    must_fail: bool = True  # False when a mutation may still be a valid request


def encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def seeds_of_every_format(rng: np.random.Generator) -> dict[str, bytes]:
    array = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    frames = [Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)) for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return {
        "png": encode(array, "PNG"),
        "png-rgba-interlaced": encode(np.dstack([array, array[:, :, :1]]), "PNG", optimize=False),
        "jpeg": encode(array, "JPEG"),
        "jpeg-progressive": encode(array, "JPEG", progressive=True),
        "gif": encode(array, "GIF"),
        "gif-animated": buf.getvalue(),
        "bmp": encode(array, "BMP"),
    }


def mutate(data: bytes, rnd: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(5)
        pos = rnd.randrange(max(len(out), 1))
        if op == 0 and out:  # flip a byte
            out[pos] = rnd.randrange(256)
        elif op == 1:  # truncate
            del out[pos:]
        elif op == 2:  # insert junk
            out[pos:pos] = rnd.randbytes(rnd.randint(1, 64))
        elif op == 3 and len(out) > 30:  # scribble over the header
            p = rnd.randrange(min(len(out) - 4, 30))
            out[p : p + 4] = struct.pack(
                "<I", rnd.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, rnd.getrandbits(32)])
            )
        else:  # duplicate a slice
            end = min(len(out), pos + rnd.randint(1, 512))
            out[pos:pos] = out[pos:end]
    return bytes(out)


def predict(*images: pb.Image, name: str = "", version: int = 0, top_k: int = 0) -> bytes:
    return pb.PredictRequest(
        model_spec=pb.ModelSpec(name=name, version=version), images=list(images), top_k=top_k
    ).SerializeToString()


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, wire_type: int, payload: bytes = b"") -> bytes:
    key = varint((number << 3) | wire_type)
    return key + (varint(len(payload)) + payload if wire_type == 2 else payload)


def regressions() -> Iterator[Case]:
    """Requests that once crashed, hung, bloated or mislabelled a server; they run every time."""
    # 271 KB, 1x1 screen, one 20000x20000 frame: OK and +1.5 GB RSS when only the screen was checked.
    yield Case(
        "regression: GIF frame beyond its screen",
        PREDICT,
        predict(pb.Image(encoded=constant_gif(20000, 20000))),
    )
    yield Case(
        "regression: GIF with three huge frames",
        PREDICT,
        predict(pb.Image(encoded=stub_gif((1, 1), [(20000, 20000)] * 3))),
    )
    # Malformed protobufs answered UNKNOWN with the Python exception class, uncounted.
    yield Case("regression: 3 bytes of 0xff", PREDICT, b"\xff\xff\xff")
    yield Case("regression: bad UTF-8 in the model name", PREDICT, field(1, 2, field(1, 2, b"\xff\xfe")))
    # A 20,000-character name made NOT_FOUND's text exceed gRPC's metadata limit.
    yield Case(
        "regression: 20,000-character name", PREDICT, predict(pb.Image(encoded=b"x"), name="n" * 20000)
    )
    yield Case(
        "regression: 20,000-character name (metadata)",
        METADATA,
        pb.GetModelMetadataRequest(model_spec=pb.ModelSpec(name="m" * 20000)).SerializeToString(),
    )


def generate(rng: np.random.Generator, rnd: random.Random, valid_png: bytes) -> Iterator[Case]:
    seeds = seeds_of_every_format(rng)
    formats = ("png", "jpeg", "gif", "bmp")
    ok_raw = pb.RawImage(dtype=pb.DATA_TYPE_UINT8, shape=[SIZE, SIZE, 3], data=bytes(SIZE * SIZE * 3))
    bombs = [
        ("bomb: real GIF frame beyond its screen", constant_gif(4000, 2000)),
        ("bomb: real GIF, 2 frames over the sum", constant_gif(1500, 1500, frames=2)),
        ("bomb: real PNG of zeros", zeros_png(2500, 2000)),
        *((f"bomb: {fmt} header claims 60000x60000", header_only(fmt, 60000, 60000)) for fmt in formats),
        ("bomb: GIF cross-shaped frames", stub_gif((1, 1), [(20000, 1), (1, 20000)])),
    ]
    generators: list[Callable[[], Case]] = [
        lambda: Case("random bytes", PREDICT, predict(pb.Image(encoded=rnd.randbytes(rnd.randint(1, 2048))))),
        lambda: Case(
            "random bytes behind a real magic",
            PREDICT,
            predict(
                pb.Image(encoded=seeds[rnd.choice(list(seeds))][:8] + rnd.randbytes(rnd.randint(0, 512)))
            ),
        ),
        lambda: Case(
            "mutated image",
            PREDICT,
            predict(pb.Image(encoded=mutate(seeds[rnd.choice(list(seeds))], rnd))),
            must_fail=False,
        ),
        lambda: (lambda b: Case(b[0], PREDICT, predict(pb.Image(encoded=b[1]))))(rnd.choice(bombs)),
        lambda: Case(
            "raw: bad shape",
            PREDICT,
            predict(
                pb.Image(
                    raw=pb.RawImage(
                        dtype=rnd.choice([0, 1, 2, 7, -1]),
                        shape=[
                            rnd.choice([-(2**63), -1, 0, 1, 2, 5, 2**31, 2**62, 2**63 - 1])
                            for _ in range(rnd.randint(0, 5))
                        ],
                        data=rnd.randbytes(rnd.randint(0, 64)),
                    )
                )
            ),
        ),
        lambda: Case(
            "raw: data length off by one",
            PREDICT,
            predict(
                pb.Image(
                    raw=pb.RawImage(
                        dtype=1, shape=[SIZE, SIZE, 3], data=bytes(SIZE * SIZE * 3 + rnd.choice([-1, 1]))
                    )
                )
            ),
        ),
        lambda: Case(
            "raw: float32 NaN and infinities",
            PREDICT,
            predict(
                pb.Image(
                    raw=pb.RawImage(
                        dtype=2,
                        shape=[4, 4, 3],
                        data=np.array([np.nan, np.inf, -np.inf, 1e38] * 12, "<f4").tobytes(),
                    )
                )
            ),
            must_fail=False,
        ),
        lambda: Case(
            "bad name or version",
            PREDICT,
            predict(
                pb.Image(raw=ok_raw),
                name=rnd.choice(
                    [
                        "nope",
                        "",
                        "tiny/../x",
                        "\x00",
                        "é" * rnd.randint(1, 9000),
                        "t" * rnd.randint(300, 30000),
                    ]
                ),
                version=rnd.choice([-(2**63), -1, 2, 99, 2**63 - 1]),
            ),
        ),
        lambda: Case(
            "bad top_k",
            PREDICT,
            predict(pb.Image(raw=ok_raw), top_k=rnd.choice([-(2**31), -1, 4, 2**31 - 1])),
        ),
        lambda: Case(
            "too many images", PREDICT, predict(*[pb.Image(raw=ok_raw)] * (MAX_IMAGES + rnd.randint(1, 20)))
        ),
        lambda: Case("empty request", PREDICT, predict()),
        lambda: Case(
            "wire: random bytes",
            rnd.choice([PREDICT, METADATA]),
            rnd.randbytes(rnd.randint(1, 300)),
            must_fail=False,
        ),
        lambda: Case(
            "wire: truncated request",
            PREDICT,
            (lambda b: b[: rnd.randrange(1, len(b))])(predict(pb.Image(encoded=valid_png))),
        ),
        lambda: Case("wire: over-long varint", PREDICT, b"\x18" + b"\xff" * rnd.randint(10, 40) + b"\x01"),
        lambda: Case(
            "wire: length past the end", PREDICT, b"\x12" + varint(rnd.randint(100, 2**31)) + b"\x0a\x00"
        ),
        lambda: Case("wire: deep nesting", PREDICT, _nested(rnd.randint(90, 400))),
        lambda: Case(
            "wire: wrong wire type",
            PREDICT,
            field(2, rnd.choice([0, 1, 5]), b"\x01" * 8) + field(1, 0, b"\x05"),
        ),
        lambda: Case(
            "wire: bad UTF-8 in the name",
            PREDICT,
            field(1, 2, field(1, 2, rnd.randbytes(8) + b"\xc3\x28")) + field(2, 2, field(1, 2, valid_png)),
        ),
        lambda: Case("wire: group tags", PREDICT, b"\x0b" * rnd.randint(1, 200)),
        # The other protocols' servicers are registered the same way: malformed is INVALID_ARGUMENT.
        lambda: Case(
            "wire: v2 and TF Serving, malformed",
            rnd.choice([V2_INFER, TFS_PREDICT]),
            rnd.choice([b"\xff\xff\xff", b"\x0b" * 50, _nested(200), b"\x0a\x05\xc3\x28abc"]),
        ),
        lambda: Case(
            "oversize message", PREDICT, predict(pb.Image(encoded=b"\0" * (MAX_MESSAGE_MB * 2**20 + 1)))
        ),
    ]
    weights = [10, 8, 25, 8, 6, 3, 2, 6, 3, 1, 1, 8, 6, 3, 3, 2, 3, 3, 2, 3, 0.2]
    yield from regressions()
    while True:
        yield rnd.choices(generators, weights)[0]()


def _nested(depth: int) -> bytes:
    # A ModelSpec-in-ModelSpec chain as unknown fields of ever deeper submessages.
    body = b""
    for _ in range(depth):
        body = field(1, 2, body)
    return body


def metric_counts(url: str) -> Counter:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    counts: Counter = Counter()
    for line in text.splitlines():
        match = re.match(r"fovea_requests_total\{(.*)\} ([0-9.e+]+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            counts[(labels["method"], labels["code"])] += int(float(match.group(2)))
    return counts


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def start_fuzz_server(tmp_path_factory, *more: str) -> ServerProcess:
    """A `fovea serve` of the tiny model with this module's limits, plus `more` flags (later flags win)."""
    models = tmp_path_factory.mktemp("models")
    export_tiny(models, "tiny", SIZE, seed=3)
    extra = [
        "--max-pixels", str(MAX_PIXELS), "--max-message-mb", str(MAX_MESSAGE_MB),
        "--max-images-per-request", str(MAX_IMAGES), "--max-batch-size", "8", "--log-level", "WARNING",
        # XLA compiles in the background after SERVING and then answers within 1e-4, not bit for bit:
        # off, so "the same answer before and after" compares like with like.
        "--no-xla", *more,
    ]  # fmt: skip
    return ServerProcess(models, extra, env=subprocess_env()).start(ready_timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = start_fuzz_server(tmp_path_factory)
    yield process
    process.stop()


def test_malformed_requests_get_bounded_counted_answers(server) -> None:
    rng, rnd = np.random.default_rng(SEED), random.Random(SEED)
    valid_png = encode(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "PNG")
    options = [("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)]
    with grpc.insecure_channel(server.target, options=options) as ch:
        calls = {m: ch.unary_unary(m) for m in (PREDICT, METADATA, V2_INFER, TFS_PREDICT)}  # raw bytes

        def valid_answer() -> bytes:
            body = pb.PredictRequest(images=[pb.Image(encoded=valid_png)], return_probabilities=True)
            return calls[PREDICT](body.SerializeToString(), timeout=30)

        before_answer = valid_answer()
        before_counts = metric_counts(server.metrics_url)
        rss_start = peak_rss_mib(server.process.pid)

        outcomes: Counter = Counter()  # (kind, code)
        sent: Counter = Counter()  # (method name, code) as the server should count them
        bad: list[str] = []
        window = threading.BoundedSemaphore(WINDOW)
        lock = threading.Lock()
        cases = generate(rng, rnd, valid_png)
        start = time.monotonic()

        def done(case: Case, future: grpc.Future) -> None:
            error = future.exception()
            code = "OK" if error is None else error.code().name
            details = "" if error is None else (error.details() or "")
            grpc_refused = code == "RESOURCE_EXHAUSTED" and "larger than max" in details
            with lock:
                outcomes[(case.kind, code)] += 1
                if not grpc_refused:  # gRPC refuses oversize messages before any handler can count them
                    sent[(case.method.rsplit("/", 1)[1], code)] += 1
                # RESOURCE_EXHAUSTED only for shedding or an oversize message, not e.g. a metadata overflow.
                wrong_exhausted = code == "RESOURCE_EXHAUSTED" and not (grpc_refused or "overload" in details)
                if (
                    code not in ALLOWED
                    or (case.must_fail and code == "OK")
                    or wrong_exhausted
                    or len(details) > 1024
                    or "Traceback" in details
                ):
                    bad.append(f"{case.kind}: {code} {details[:200]!r}")
            window.release()

        for _ in range(REQUESTS):
            case = next(cases)
            window.acquire()
            future = calls[case.method].future(case.body, timeout=60)
            future.add_done_callback(lambda f, c=case: done(c, f))
        for _ in range(WINDOW):
            window.acquire()
        elapsed = time.monotonic() - start

        after_answer = valid_answer()
        after_counts = metric_counts(server.metrics_url)
        rss_peak = peak_rss_mib(server.process.pid)
        from fovea.client import Client

        with Client(server.target) as c:
            health = c.health(timeout=10)

    counted = {
        k: after_counts[k] - before_counts[k] for k in after_counts if after_counts[k] != before_counts[k]
    }
    print(
        f"\nfuzz: seed {SEED}, {REQUESTS} requests in {elapsed:.1f} s ({REQUESTS / elapsed:.0f}/s), window {WINDOW}"
    )
    by_code = Counter()
    for (_, code), n in outcomes.items():
        by_code[code] += n
    print("fuzz: answers by code:", dict(sorted(by_code.items())))
    for kind in sorted({k for k, _ in outcomes}):
        row = {code: n for (k, code), n in outcomes.items() if k == kind}
        print(f"fuzz:   {kind}: {row}")
    print(
        f"fuzz: peak RSS {rss_start:.0f} MiB before, {rss_peak:.0f} MiB after; bound +{rss_growth_bound_mib():.0f} MiB"
    )
    print(
        f"fuzz: health {health}; counted by the server: {sum(counted.values())} of {sum(sent.values()) + 1} handled"
    )

    assert not bad, f"{len(bad)} wrong answers, first ones: {bad[:10]}"
    # Every request a handler saw is counted, by method and code (+1 OK Predict: the valid request after).
    expected = Counter(sent)
    expected[("Predict", "OK")] += 1
    assert Counter(counted) == expected
    assert rss_peak - rss_start <= rss_growth_bound_mib()
    assert health == "SERVING"
    assert after_answer == before_answer
    assert sum(n for (kind, _), n in outcomes.items() if kind.startswith("regression")) == len(
        list(regressions())
    )
