"""Hostile clients of the REST port, for its tests and bench/rest_hostile.py: slow bodies, raw requests,
compression bombs, and a gRPC health poller to show what they cost everyone else."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field


def gzip_bomb(inflated_bytes: int) -> bytes:
    """A gzip body of `inflated_bytes` zeros in about 1/1000 of that, made in a moment: one 1 MiB
    piece compressed once after a full flush (so it refers to nothing before it) and repeated. The
    trailer's CRC is left 0 (computing it would cost seconds of CPU per GiB): a server that inflates
    to the end refuses it there, one that stops at its limit never reads it."""
    piece = bytes(1 << 20)
    first = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # with the gzip header
    head = first.compress(piece) + first.flush(zlib.Z_FULL_FLUSH)
    raw = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = raw.compress(piece) + raw.flush(zlib.Z_FULL_FLUSH)
    pieces = max(1, inflated_bytes >> 20)
    return b"".join(
        [head, block * (pieces - 1), raw.flush(), struct.pack("<II", 0, (pieces << 20) & 0xFFFFFFFF)]
    )


def gzip_json(value: object) -> bytes:
    return gzip.compress(json.dumps(value).encode())


def post(
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
    host: str = "127.0.0.1",
) -> tuple[int, bytes]:
    """One POST on a fresh connection: (status, response body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def raw_exchange(
    port: int, data: bytes, timeout: float = 5.0, host: str = "127.0.0.1", hang_up: bool = False
) -> bytes:
    """Send raw bytes (a request that lies in its headers, say) and read until the server closes or
    `timeout` passes with nothing more; with `hang_up`, close right after sending instead."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        if hang_up:
            return b""
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def slow_headers(port: int, interval_s: float, give_up_s: float, host: str = "127.0.0.1") -> float | None:
    """Send a request's headers a byte every `interval_s`; the seconds until the server closed the
    connection, or None if it still had not after `give_up_s`."""
    head = b"POST /v2/models/x/infer HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=interval_s) as sock:
        for byte in head:
            if time.monotonic() - start > give_up_s:
                return None
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(4096) == b"":
                    return time.monotonic() - start
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - start
    return None


def statuses(reply: bytes) -> list[int]:
    """The HTTP statuses in a raw reply (one per response on the connection)."""
    return [
        int(line.split()[1])
        for line in reply.split(b"\r\n")
        if line.startswith(b"HTTP/1.") and len(line.split()) > 1
    ]


@dataclass
class SlowClients:
    """Connections sending a request whose body trickles in (one byte every `interval_s`)."""

    connected: int = 0
    answers: list[int] = field(default_factory=list)  # statuses the server answered them with
    closed_by_server: int = 0


@contextmanager
def slow_bodies(
    port: int,
    count: int,
    path: str,
    declared: int = 1_000_000,
    interval_s: float = 2.0,
    host: str = "127.0.0.1",
    reconnect: bool = True,
) -> Iterator[SlowClients]:
    """`count` clients each declaring a `declared`-byte body and sending a byte every `interval_s`, until
    the block ends or the server answers or closes (then, with `reconnect`, they start again, as an
    attacker would); each answer is recorded."""
    result = SlowClients()
    stop = threading.Event()
    lock = threading.Lock()

    def one() -> None:
        try:
            sock = socket.create_connection((host, port), timeout=5)
        except OSError:
            return
        with sock:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {declared}\r\n\r\n"
            ).encode()
            try:
                sock.sendall(head)
                with lock:
                    result.connected += 1
                sock.settimeout(interval_s)
                while not stop.is_set():
                    try:
                        reply = sock.recv(4096)  # the server answered (408, 429) or closed
                    except TimeoutError:
                        sock.sendall(b" ")
                        continue
                    with lock:
                        found = statuses(reply)
                        result.answers.extend(found)
                        result.closed_by_server += not reply
                    return
            except OSError:
                with lock:
                    result.closed_by_server += 1

    def client() -> None:
        one()
        while reconnect and not stop.is_set():
            one()
            stop.wait(0.05)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    try:
        yield result
    finally:
        stop.set()
        for t in threads:
            t.join(interval_s + 5)


def timed_post(port: int, path: str, body: bytes, timeout: float = 30.0) -> tuple[int, float]:
    """(status, seconds) of one POST."""
    start = time.perf_counter()
    try:
        status, _ = post(port, path, body, timeout=timeout)
    except (OSError, http.client.HTTPException):
        status = 0
    return status, time.perf_counter() - start


def timed_get(port: int, path: str, timeout: float = 30.0, host: str = "127.0.0.1") -> tuple[int, float]:
    """(status, seconds) of one GET (0: no answer)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException):
        status = 0
    finally:
        conn.close()
    return status, time.perf_counter() - start


def health_latencies(target: str, stop: threading.Event, every_s: float = 0.02) -> list[float]:
    """Poll grpc.health.v1 Check on `target` until `stop`; the list (filled meanwhile) holds each latency."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    latencies: list[float] = []

    def poll() -> None:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                start = time.perf_counter()
                with suppress(grpc.RpcError):
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                latencies.append(time.perf_counter() - start)
                stop.wait(every_s)

    threading.Thread(target=poll, daemon=True).start()
    return latencies
