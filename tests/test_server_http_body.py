"""The REST port's body rules without a server: inflation bounded by its output, the nesting count
(v2_json.py), and which slow bodies count against the limit (http_body.py)."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import pytest

pytest.importorskip("aiohttp", reason="the REST port needs the server extra")

from fovea.server import http_body, v2_json
from fovea.server.errors import InvalidArgument


def test_a_bomb_stops_at_the_limit_and_corrupt_streams_are_bad_input() -> None:
    bomb = gzip.compress(bytes(200 * 2**20), 9)  # 200 MiB of zeros in ~200 KB
    with pytest.raises(http_body.BodyTooLarge, match="inflates to more than"):
        http_body.inflate(bomb, "gzip", 4 * 2**20)
    text = b'{"inputs": []}' * 100
    assert http_body.inflate(gzip.compress(text), "gzip", 2**20) == text
    assert http_body.inflate(zlib.compress(text), "deflate", 2**20) == text
    raw = zlib.compressobj(wbits=-15)
    assert http_body.inflate(raw.compress(text) + raw.flush(), "deflate", 2**20) == text  # raw deflate too
    assert http_body.inflate(text, "identity", 2**20) == text
    for data, coding in [
        (b"not gzip at all", "gzip"),
        (gzip.compress(text)[:-12], "gzip"),  # truncated
        (b"", "deflate"),
        (b"\x00\x01", "br"),
        (text, "compress"),
        (text, "gzip, gzip"),
    ]:
        with pytest.raises(InvalidArgument):
            http_body.inflate(data, coding, 2**20)


def test_nesting_is_counted_outside_strings() -> None:
    assert v2_json.json_depth(b'{"a": [[1], [2, [3]]]}') == 4
    assert v2_json.json_depth(b'{"s": "[[[[{{{{ \\" [[[["}') == 1
    assert v2_json.json_depth(b"[" * 100_000) == 100_000
    assert v2_json.json_depth(b"12") == 0


def test_bodies_behind_the_rate_stop_counting_and_the_slowest_is_evicted() -> None:
    now = [0.0]
    bodies = http_body.Bodies(limit=2, timeout_s=10, max_bytes=2**20, clock=lambda: now[0])

    async def scenario() -> None:
        with bodies.slot() as slow_a, bodies.slot() as slow_b:
            assert bodies.counted() == 2  # both just started
            with pytest.raises(http_body.ResourceExhausted, match="already in flight"), bodies.slot():
                pass
            now[0] = 1.0  # a second on, with 10 bytes each: behind 1 MB/s
            slow_a.received, slow_b.received = 10, 20
            assert bodies.counted() == 0
            with bodies.slot() as fast:  # admitted: the slow ones no longer count
                fast.received = 2_000_000
                assert bodies.counted() == 1
                assert bodies.held() == 3 == bodies.most_held()
                with bodies.slot():  # one more than held: the furthest behind (slow_a) is evicted
                    assert slow_a.evicted and not slow_b.evicted and not fast.evicted
                    assert bodies.held() == 3

    asyncio.run(scenario())
