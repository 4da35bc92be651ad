"""Fuzz and attack the KServe v2 REST port of a real `fovea serve` process, as test_server_fuzz.py does gRPC.

A few thousand malformed bodies and headers (wrong JSON types, NaN and out-of-range pixels, deep
nesting, corrupt and bombing Content-Encodings, lying lengths, repeated outputs, huge counts): only
200 (for a mutation that stays valid) and 4xx may come back, never 5xx; every answer is counted by
the server as its code; peak RSS growth stays within what docs/memory.md allows the settings; the
server's log stays throttled (no traceback); it stays ready and answers a valid request the same
before and after. Then the attacks of the REST issue one by one: slow bodies, a gzip bomb, deep JSON,
repeated outputs and huge BYTES counts, each answered 4xx while health keeps answering (the figures
are printed, not asserted). Set FOVEA_FUZZ_SEED to vary the run.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import random
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the REST fuzz test needs the server extra")

from _serving import wait_until
from fovea.devtools import hostile_http as hostile
from test_server_fuzz import MAX_MESSAGE_MB, SIZE, encode, metric_counts, peak_rss_mib, start_fuzz_server
from test_server_fuzz import rss_growth_bound_mib as grpc_rss_growth_bound_mib

REQUESTS = int(os.environ.get("FOVEA_REST_FUZZ_REQUESTS", "3000"))
SEED = int(os.environ.get("FOVEA_FUZZ_SEED", "20251202"))
MAX_RPCS = 16  # REST bodies counted at once: small, so the slow-body test holds more than twice as many
BODY_TIMEOUT_S = 1.0  # --http-body-timeout: a 1 MB body then has 2 s
WORKERS = 12
MODEL, ENCODED = "tiny", "tiny-encoded"
INFER, ENCODED_INFER = f"/v2/models/{MODEL}/infer", f"/v2/models/{ENCODED}/infer"
STATUS_CODE = {
    200: "OK",
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    504: "DEADLINE_EXCEEDED",
}
LOG_LINES_PER_S = 25  # two throttles of 10 lines a second, their summaries, and a margin


def rss_growth_bound_mib() -> float:
    """The gRPC fuzz test's bound, with this module's --max-concurrent-rpcs."""
    return grpc_rss_growth_bound_mib(max_concurrent_rpcs=MAX_RPCS)


@dataclass
class Case:
    kind: str
    body: bytes
    path: str = INFER
    headers: dict[str, str] = field(default_factory=dict)
    must_fail: bool = True  # False when the request may still be valid


def tensor(data=None, shape=None, datatype="UINT8", name="images", **extra) -> dict:
    t = {"name": name, "datatype": datatype, "shape": [1, SIZE, SIZE, 3] if shape is None else shape}
    t["data"] = [0] * (SIZE * SIZE * 3) if data is None else data
    return {**t, **extra}


def body(*inputs: dict, **top) -> bytes:
    return json.dumps({"inputs": list(inputs) or [tensor()], **top}, allow_nan=True).encode()


def nested(depth: int, leaf: str = "0") -> str:
    return "[" * depth + leaf + "]" * depth


HOSTILE_VALUES = [None, "x", {}, {"a": 1}, [], True, 1.5, -1, 256, 2**40, 4_000_000_000, 1e12]
HOSTILE_TEXT = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "null",
    '"7"',
    "{}",
    "[[]]",
    "1" + "0" * 5000,
]


def generate(rnd: random.Random, png: bytes) -> Iterator[Case]:
    pixels = SIZE * SIZE * 3
    good = body()

    def uint8_element() -> Case:
        # One bad element among valid ones, written as JSON text (NaN and Infinity are not JSON).
        text = good.decode()
        at = text.index("[0, ") + 1 + 3 * rnd.randrange(pixels - 1)
        return Case(
            "uint8 element: bad value", (text[:at] + rnd.choice(HOSTILE_TEXT) + text[at + 1 :]).encode()
        )

    def bytes_data() -> Case:
        data = [rnd.choice([*HOSTILE_VALUES, "not an image"]) for _ in range(rnd.randint(1, 3))]
        shape = rnd.choice([[len(data)], [len(data), 1], [4_000_000_000], [4_000_000_000, 1]])
        return Case(
            "bytes data: not strings", body(tensor(data, shape, "BYTES", "image_bytes")), ENCODED_INFER
        )

    def wrong_types() -> Case:
        key = rnd.choice(["shape", "datatype", "name", "data", "parameters"])
        value = rnd.choice([*HOSTILE_VALUES, [1.5, 2], [True], [None], ["1"], [[1]], [2**70]])
        fine = key == "parameters" and value in (None, {}, {"a": 1})
        return Case(f"wrong type: inputs[0].{key}", body({**tensor(), key: value}), must_fail=not fine)

    def wrong_top() -> Case:
        key = rnd.choice(["inputs", "outputs", "parameters", "id"])
        value = rnd.choice([*HOSTILE_VALUES, [1], [None], [{"name": 5}], [{"parameters": []}]])
        fine = (
            value is None
            or (value in ({}, {"a": 1}) and key == "parameters")
            or (value == "x" and key == "id")
            or (value == [] and key == "outputs")
        )
        return Case(
            f"wrong type: {key}", json.dumps({"inputs": [tensor()], key: value}).encode(), must_fail=not fine
        )

    def timeout() -> Case:
        text = (
            good.decode()[:-1]
            + ', "parameters": {"timeout": '
            + rnd.choice([*HOSTILE_TEXT, "-5", "1e300"])
            + "}}"
        )
        return Case("parameter: timeout", text.encode(), must_fail=False)

    def classification() -> Case:
        k = rnd.choice([*HOSTILE_VALUES, 0, 1, 3, 2**63])
        outputs = [
            {"name": "probabilities", "parameters": {"classification": k, "binary_data": rnd.random() < 0.5}}
        ]
        return Case("output: classification", body(outputs=outputs), must_fail=False)

    def repeated_outputs() -> Case:
        outputs = [{"name": rnd.choice(["probabilities", "probabilities", "nope"])}] * rnd.randint(2, 20000)
        return Case("outputs: repeated", body(outputs=outputs))

    def deep() -> Case:
        depth = rnd.choice([65, 990, 5000, 10000, 100000])
        where = rnd.choice(["data", "parameters", "top", "outputs"])
        if where == "data":
            text = body(tensor(data=[0])).decode().replace("[0]", nested(depth), 1)
        elif where == "parameters":
            text = good.decode()[:-1] + ', "parameters": {"x": ' + nested(depth) + "}}"
        elif where == "outputs":
            text = good.decode()[:-1] + ', "outputs": ' + nested(depth, "{}") + "}"
        else:
            text = nested(depth, good.decode())
        return Case(f"deep JSON: {where}", text.encode())

    def encoding() -> Case:
        coding = rnd.choice(["gzip", "deflate", "br", "x-gzip", "compress", "gzip, gzip", "zstd", "GZIP"])
        packed = {
            "gzip": gzip.compress(good),
            "x-gzip": gzip.compress(good),
            "GZIP": gzip.compress(good),
            "deflate": zlib.compress(good),
        }.get(coding, good)
        how = rnd.choice(["valid", "truncated", "flipped", "random", "bomb"])
        if how == "truncated":
            packed = packed[: rnd.randrange(1, len(packed))]
        elif how == "flipped":
            p = bytearray(packed)
            for _ in range(rnd.randint(1, 8)):
                p[rnd.randrange(len(p))] = rnd.randrange(256)
            packed = bytes(p)
        elif how == "random":
            packed = rnd.randbytes(rnd.randint(0, 2000))
        elif how == "bomb":
            packed = _bomb(coding) or packed
        return Case(
            f"content-encoding: {coding}, {how}",
            packed,
            headers={"Content-Encoding": coding},
            must_fail=how == "bomb" or coding in ("compress", "gzip, gzip", "zstd") or how != "valid",
        )

    def header_length() -> Case:
        header = good
        value = rnd.choice(
            ["-1", "abc", "", str(len(header) + 1), str(2**64), "1e3", " 5", str(rnd.randrange(len(header)))]
        )
        return Case(
            "binary extension: bad header length", header, headers={"Inference-Header-Content-Length": value}
        )

    def binary_size() -> Case:
        size = rnd.choice([-1, True, "5", 2**40, pixels + 1, pixels - 1, None, 1.5])
        t = {
            "name": "images",
            "datatype": "UINT8",
            "shape": [1, SIZE, SIZE, 3],
            "parameters": {"binary_data_size": size},
        }
        header = json.dumps({"inputs": [t]}).encode()
        return Case(
            "binary extension: bad binary_data_size",
            header + bytes(pixels),
            headers={"Inference-Header-Content-Length": str(len(header))},
        )

    def junk() -> Case:
        how = rnd.choice(["random", "truncated", "utf-16", "bad utf-8", "not an object", "empty"])
        data = {
            "random": rnd.randbytes(rnd.randint(1, 3000)),
            "truncated": good[: rnd.randrange(1, len(good))],
            "utf-16": good.decode().encode("utf-16"),
            "bad utf-8": good[:40] + b"\xff\xfe" + good[40:],
            "not an object": rnd.choice([b"[]", b"5", b'"x"', b"null"]),
            "empty": b"",
        }[how]
        return Case(f"junk body: {how}", data)

    def names() -> Case:
        name = rnd.choice(["nope", "tiny/../x", "%00", "t" * rnd.randint(200, 3000), "tiny-encoded-encoded"])
        version = rnd.choice(
            ["", "/versions/0", "/versions/-1", "/versions/abc", "/versions/99", "/versions/" + "9" * 40]
        )
        return Case("bad model or version", good, f"/v2/models/{name}{version}/infer")

    def huge_count() -> Case:
        data = rnd.choice([[4_000_000_000], [1e12], [-1], [2**63]])
        return Case("bytes: a count as data", body(tensor(data, [1], "BYTES", "image_bytes")), ENCODED_INFER)

    def oversize() -> Case:
        return Case("oversize body", b" " * (MAX_MESSAGE_MB * 2**20 + 1))

    def valid() -> Case:
        how = rnd.choice(["json", "binary", "encoded", "gzip"])
        if how == "binary":
            t = {"name": "images", "datatype": "UINT8", "shape": [1, SIZE, SIZE, 3]}
            header = json.dumps({"inputs": [{**t, "parameters": {"binary_data_size": pixels}}]})
            return Case(
                "valid: binary",
                header.encode() + bytes(pixels),
                headers={"Inference-Header-Content-Length": str(len(header))},
                must_fail=False,
            )
        if how == "encoded":
            t = {
                "name": "image_bytes",
                "datatype": "BYTES",
                "shape": [1, 1],
                "parameters": {"binary_data_size": len(png) + 4},
            }
            header = json.dumps({"inputs": [t]}).encode()
            raw = len(png).to_bytes(4, "little") + png
            return Case(
                "valid: encoded",
                header + raw,
                ENCODED_INFER,
                {"Inference-Header-Content-Length": str(len(header))},
                must_fail=False,
            )
        if how == "gzip":
            return Case(
                "valid: gzip", gzip.compress(good), headers={"Content-Encoding": "gzip"}, must_fail=False
            )
        return Case("valid: json", good, must_fail=False)

    generators: list[Callable[[], Case]] = [
        uint8_element, bytes_data, wrong_types, wrong_top, timeout, classification, repeated_outputs,
        deep, encoding, header_length, binary_size, junk, names, huge_count, oversize, valid,
    ]  # fmt: skip
    weights = [8, 8, 10, 8, 5, 5, 2, 4, 10, 4, 4, 6, 4, 3, 0.3, 6]
    while True:
        yield rnd.choices(generators, weights)[0]()


@functools.cache
def _bomb(coding: str) -> bytes | None:
    """A body in `coding` that inflates to just past the message limit (made once: brotli is slow)."""
    zeros = bytes((MAX_MESSAGE_MB + 1) * 2**20)
    if coding == "deflate":
        return zlib.compress(zeros, 9)
    if "gzip" in coding.lower():
        return gzip.compress(zeros, 9)
    if coding == "br":
        try:
            import brotli
        except ImportError:
            return None
        return brotli.compress(zeros)
    return None


def lying_requests(port: int) -> dict[str, list[int]]:
    """Raw requests whose headers lie about their bodies; aiohttp's own parser answers some of them."""
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    cases = {
        "Content-Length shorter than the body": head + "Content-Length: 10\r\n\r\n" + "{" * 200,
        "Content-Length longer than the body": head + "Content-Length: 5000\r\n\r\n{}",
        "Content-Length not a number": head + "Content-Length: ten\r\n\r\n{}",
        "two Content-Lengths": head + "Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        "bad chunked encoding": head + "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        "garbage request line": "GARBAGE / HTTP/9.9\r\n\r\n",
        "header line too long": head + "X-Pad: " + "a" * 20000 + "\r\n\r\n",
    }
    found = {
        kind: hostile.statuses(hostile.raw_exchange(port, text.encode())) for kind, text in cases.items()
    }
    # A client that says 5000 bytes, sends 2 and hangs up: nobody to answer; counted CANCELLED.
    hostile.raw_exchange(port, (head + "Content-Length: 5000\r\n\r\n{}").encode(), timeout=0.2, hang_up=True)
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = start_fuzz_server(
        tmp_path_factory,
        "--max-concurrent-rpcs", str(MAX_RPCS), "--http-body-timeout", str(BODY_TIMEOUT_S),
        "--log-level", "INFO",  # rejections are logged (throttled): the test counts the lines
    )  # fmt: skip
    yield process
    process.stop()


def _valid_answer(port: int) -> bytes:
    status, answer = hostile.post(port, INFER, body(tensor(data=list(range(256)) * (SIZE * SIZE * 3 // 256))))
    assert status == 200, answer
    return json.loads(answer)["outputs"][0]["data"]


def _ready(port: int) -> int:
    import urllib.error
    import urllib.request

    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code


def _rest_counts(server) -> Counter:
    return Counter(
        {
            k: v
            for k, v in metric_counts(server.metrics_url).items()
            if k[0] in ("ModelInfer", "RepositoryIndex")
        }
    )


def hostile_metrics(server) -> str:
    import urllib.request

    return urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()


def test_rest_fuzz_only_4xx_and_200(server) -> None:
    rnd = random.Random(SEED)
    rng = np.random.default_rng(SEED)
    png = encode(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "PNG")
    port = server.http_port
    before_answer = _valid_answer(port)
    log_start = len(server.output)
    start = time.monotonic()

    lies = lying_requests(port)  # not counted below: aiohttp answers some before any handler runs
    # The client that hung up mid-body is CANCELLED (not INTERNAL, no traceback), once its handler sees it.
    wait_until(lambda: _rest_counts(server)[("ModelInfer", "CANCELLED")] >= 1, timeout=30, what="CANCELLED")
    before_counts = _rest_counts(server)
    rss_start = peak_rss_mib(server.process.pid)
    cases = [c for c, _ in zip(generate(rnd, png), range(REQUESTS), strict=False)]

    def send(case: Case) -> tuple[Case, int, bytes]:
        try:
            status, answer = hostile.post(port, case.path, case.body, case.headers, timeout=60)
        except Exception as exc:  # the server closed on an oversize body before reading it
            return case, 0, repr(exc).encode()
        return case, status, answer

    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(send, cases))
    elapsed = time.monotonic() - start

    after_answer = _valid_answer(port)
    after_counts = _rest_counts(server)
    rss_peak = peak_rss_mib(server.process.pid)
    ready = _ready(port)
    log = server.output[log_start:]

    outcomes: Counter = Counter((c.kind, status) for c, status, _ in results)
    bad = []
    sent: Counter = Counter()
    for case, status, answer in results:
        allowed = (
            status in (400, 404, 413)
            or (status == 429 and b"overload" in answer)
            or (status == 200 and not case.must_fail)
            # A `timeout` of a few microseconds is the caller's own deadline passing, not a failure.
            or (status == 504 and case.kind == "parameter: timeout" and b"deadline" in answer)
        )
        if status == 0 and case.kind == "oversize body":
            continue  # refused before it was read; the client broke off sending
        if not allowed or (len(answer) > 2048 and status != 200):
            bad.append(f"{case.kind}: {status} {answer[:200]!r}")
        if status in STATUS_CODE and b"Not Found: POST" not in answer:  # the router's 404: no handler ran
            sent[("ModelInfer", STATUS_CODE[status])] += 1
    counted = Counter(
        {k: after_counts[k] - before_counts[k] for k in after_counts if after_counts[k] != before_counts[k]}
    )

    print(f"\nrest fuzz: seed {SEED}, {len(results)} requests in {elapsed:.1f} s, {WORKERS} at once")
    print("rest fuzz: answers by status:", dict(sorted(Counter(s for _, s, _ in results).items())))
    for kind in sorted({k for k, _ in outcomes}):
        print(f"rest fuzz:   {kind}: {dict(sorted((s, n) for (k, s), n in outcomes.items() if k == kind))}")
    print("rest fuzz: lying headers (raw):", lies)
    print(
        f"rest fuzz: peak RSS {rss_start:.0f} MiB before, {rss_peak:.0f} after; bound +{rss_growth_bound_mib():.0f} MiB"
    )
    print(
        f"rest fuzz: {len(log)} log lines in {elapsed:.1f} s; ready {ready}; counted {sum(counted.values())} of {sum(sent.values()) + 1}"
    )

    print("rest fuzz: the log's first lines:", *(f"  {line[:200]}" for line in log[:8]), sep="\n")
    assert not bad, f"{len(bad)} wrong answers, first ones: {bad[:10]}"
    for kind, found in lies.items():
        assert found and all(400 <= s < 500 for s in found), (kind, found)
    expected = Counter(sent)
    expected[("ModelInfer", "OK")] += 1  # the valid request after
    assert counted == expected
    assert rss_peak - rss_start <= rss_growth_bound_mib()
    assert ready == 200
    assert after_answer == before_answer
    assert not [line for line in log if "Traceback" in line], "\n".join(log[-40:])
    assert len(log) <= LOG_LINES_PER_S * (elapsed + 2), f"{len(log)} log lines in {elapsed:.1f} s"
    assert 'code="INTERNAL"' not in "\n".join(
        line for line in hostile_metrics(server).splitlines() if 'protocol="v2-http"' in line
    )


def test_slow_bodies_leave_rest_answering(server) -> None:
    """80 clients trickling 1 MB bodies (a byte every 0.3 s, reconnecting when answered) against 16 REST
    slots: normal infers still answer 200 throughout; the slow ones get 408 (deadline or eviction)."""
    port = server.http_port
    good = body()
    samples: list[tuple[int, float]] = []
    ready: list[int] = []
    with hostile.slow_bodies(port, 80, INFER, declared=1_000_000, interval_s=0.3) as slow:
        wait_until(lambda: slow.connected >= 80, timeout=30, what="80 slow clients connected")
        for _ in range(12):
            time.sleep(0.5)
            samples.append(hostile.timed_post(port, INFER, good))
            ready.append(_ready(port))
    latencies = ", ".join(f"{s}:{t * 1000:.0f}ms" for s, t in samples)
    print(
        f"\nslow bodies: {slow.connected} connections; normal infers meanwhile: {latencies}; readiness {ready}"
    )
    print(
        f"slow bodies: answered {dict(Counter(slow.answers))}, closed without an answer {slow.closed_by_server}"
    )
    assert [s for s, _ in samples] == [200] * len(samples)
    assert set(ready) == {200}
    assert 408 in slow.answers and set(slow.answers) <= {408, 429}
    assert 'code="INTERNAL"' not in "\n".join(
        line for line in hostile_metrics(server).splitlines() if 'protocol="v2-http"' in line
    )


def test_slow_headers_are_cut_off(server) -> None:
    closed_after = hostile.slow_headers(server.http_port, interval_s=0.2, give_up_s=20 * BODY_TIMEOUT_S)
    print(f"\nslow headers (a byte every 0.2 s): closed by the server after {closed_after} s")
    assert closed_after is not None


def test_gzip_bomb_costs_what_the_limit_allows(server) -> None:
    bomb = hostile.gzip_bomb(512 * 2**20)  # ~0.5 MB that inflates to 512 MiB, 128x the 4 MiB limit
    before = server.cpu_seconds()
    status, answer = hostile.post(server.http_port, INFER, bomb, {"Content-Encoding": "gzip"})
    cpu = server.cpu_seconds() - before
    print(f"\ngzip bomb: {len(bomb) / 1e6:.2f} MB -> 512 MiB: HTTP {status} after {cpu:.2f} s of server CPU")
    assert status == 413 and b"inflates to more than" in answer, answer


def test_costly_requests_are_refused_while_health_answers(server) -> None:
    """Deep JSON, repeated outputs and a BYTES count the client wrote: each 400, while a gRPC health
    check polls beside them (its latencies are printed)."""
    port = server.http_port
    json_cap = MAX_MESSAGE_MB * 2**20 // 4
    cases = {
        "deep JSON (0.9 MiB of brackets)": nested(int(json_cap * 0.45), "0").encode(),
        "repeated outputs": body(outputs=[{"name": "probabilities"}] * 20000),
        "BYTES data [4000000000]": body(tensor([4_000_000_000], [1], "BYTES", "image_bytes")),
        "BYTES data [1e12]": body(tensor([1e12], [1], "BYTES", "image_bytes")),
        "BYTES shape [4000000000]": body(tensor([4_000_000_000], [4_000_000_000], "BYTES", "image_bytes")),
    }
    stop = threading.Event()
    latencies = hostile.health_latencies(server.target, stop)
    wait_until(lambda: len(latencies) >= 3, timeout=30, what="health polled")
    answers = {}
    try:
        for kind, data in cases.items():
            path = INFER if kind.startswith(("deep", "repeated")) else ENCODED_INFER
            answers[kind] = hostile.post(port, path, data)
            answers[kind] = (answers[kind][0], answers[kind][1][:160])
    finally:
        stop.set()
    print(f"\ncostly requests: {answers}")
    print(
        f"costly requests: gRPC health meanwhile: {len(latencies)} checks, max {max(latencies) * 1000:.0f} ms, "
        f"median {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms"
    )
    assert {kind: status for kind, (status, _) in answers.items()} == {kind: 400 for kind in cases}
