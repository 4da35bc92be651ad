"""How the REST port takes in a request body: in bounded time, in bounded memory, inflated in bounded work.

- **Time.** A body must arrive within `--http-body-timeout` seconds plus its size at MIN_BODY_RATE
  (1 MB/s), or the request is answered 408 and its connection closed. Headers and idle keep-alive
  connections get the same timeout (aiohttp's keep-alive timer closes a connection that has not
  completed a request's headers by then).
- **Slots.** At most `limit` bodies (--max-concurrent-rpcs) count against the 429 bound: those fully
  received (being parsed or served) and those arriving at MIN_BODY_RATE or faster. A body that falls
  behind that rate stops counting, so slow clients cannot lock the port; at most half as many again
  are held (memory.rest_bodies), and one more evicts the one furthest behind (408) instead of being refused.
- **Inflation.** aiohttp's own decompression is off (it would inflate on the event loop, as far as
  the bomb goes); `inflate` runs on the parse thread, in chunks, and stops as soon as the output
  passes the message limit, so its cost follows the limit, not the compression ratio.
The JSON itself is parsed and checked by v2_json.py (its nesting measured before json.loads
recurses into it), large bodies in the parse process (json_process.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Callable, Iterator

from aiohttp import web
from fovea.server import memory
from fovea.server.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted

MIN_BODY_RATE = 1_000_000  # bytes a second a body must keep up
_INFLATE_CHUNK = 1 << 20  # output produced per decompressor call: the overshoot past the limit
_FEED = 1 << 16  # compressed bytes handed to zlib at a time


class BodyTooLarge(ResourceExhausted):
    http_status = 413


class BodyTimeout(DeadlineExceeded):
    """The client did not send its body in time: 408, and the connection is closed."""

    http_status = 408


class Arrival:
    """One body being received, then parsed and served."""

    __slots__ = ("done", "evicted", "received", "start", "timer")

    def __init__(self, start: float) -> None:
        self.start = start
        self.received = 0
        self.done = False  # the whole body is in: it holds its slot until answered
        self.timer: asyncio.Timeout | None = None
        self.evicted = False

    def slack(self, now: float) -> float:
        """Bytes ahead of the minimum rate (negative: behind it)."""
        # No grace: with one, clients that reconnect as soon as they are refused each count for the
        # grace, and together they held every slot (the REST fuzz test's slow clients did). A real
        # body that is briefly behind only loses its count, and is the last to be evicted.
        return self.received - MIN_BODY_RATE * (now - self.start)


class Bodies:
    """The REST bodies in flight, their admission and their reading."""

    def __init__(
        self, limit: int, timeout_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limit = limit
        self.timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._clock = clock
        self._arrivals: set[Arrival] = set()

    def counted(self) -> int:
        """Bodies that count against the limit: received, or arriving at the minimum rate."""
        now = self._clock()
        return sum(1 for a in self._arrivals if a.done or a.slack(now) >= 0)

    def held(self) -> int:
        return len(self._arrivals)

    def most_held(self) -> int:
        """Bodies held at most: `limit` counted plus half as many laggards (memory.py's http term)."""
        return memory.rest_bodies(self._limit)

    @contextlib.contextmanager
    def slot(self) -> Iterator[Arrival]:
        """A place for one body, or ResourceExhausted (429) before anything is read."""
        counted = self.counted()
        if counted >= self._limit:
            raise ResourceExhausted(
                f"server overloaded: {counted} HTTP requests already in flight (--max-concurrent-rpcs "
                f"{self._limit}); retry with backoff or on another replica"
            )
        if len(self._arrivals) >= self.most_held():
            # Fewer than `limit` count, so the rest are behind the rate: drop the one furthest behind.
            now = self._clock()
            laggard = min((a for a in self._arrivals if not a.done), key=lambda a: a.slack(now))
            self._evict(laggard)
        arrival = Arrival(self._clock())
        self._arrivals.add(arrival)
        try:
            yield arrival
        finally:
            self._arrivals.discard(arrival)

    def _evict(self, arrival: Arrival) -> None:
        self._arrivals.discard(arrival)
        arrival.evicted = True
        if arrival.timer is not None:
            arrival.timer.reschedule(asyncio.get_running_loop().time())  # its read ends with BodyTimeout

    async def read(self, request: web.Request, arrival: Arrival, max_bytes: int | None = None) -> bytes:
        """The request's body as sent (still compressed), within its deadline and the size limit."""
        limit = self._max_bytes if max_bytes is None else max_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise BodyTooLarge(_too_large(length, limit, "its Content-Length says"))
        budget = self.timeout_s + (length if length is not None else limit) / MIN_BODY_RATE
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(budget) as timer:
                arrival.timer = timer
                if arrival.evicted:
                    timer.reschedule(asyncio.get_running_loop().time())
                while chunk := await request.content.readany():
                    arrival.received += len(chunk)
                    if arrival.received > limit:
                        raise BodyTooLarge(_too_large(arrival.received, limit, "it sent at least"))
                    chunks.append(chunk)
        except TimeoutError:
            raise BodyTimeout(
                f"the request body did not arrive in time: {arrival.received} of "
                f"{length if length is not None else 'an unknown number of'} bytes in {budget:.1f} s "
                f"(--http-body-timeout {self.timeout_s:g} s plus 1 s per MB); send it at 1 MB/s or faster"
            ) from None
        finally:
            arrival.timer = None
        arrival.done = True
        return b"".join(chunks)


def _too_large(size: int, limit: int, what: str) -> str:
    return (
        f"the request body is too large: {what} {size} bytes; at most {limit} are taken "
        "(--max-message-mb), after decompression too"
    )


def inflate(data: bytes, encoding: str, limit: int) -> bytes | bytearray:
    """The body undone of its Content-Encoding, refused (413) as soon as it inflates past `limit`."""
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        return data
    if coding in ("gzip", "x-gzip"):
        new = lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)  # noqa: E731
    elif coding == "deflate":
        # RFC 9110's deflate is zlib-wrapped; some clients send raw deflate (aiohttp accepts both).
        wbits = zlib.MAX_WBITS if data[:1] and data[0] & 0x0F == 8 else -zlib.MAX_WBITS
        new = lambda: zlib.decompressobj(wbits)  # noqa: E731
    elif coding == "br":
        return _inflate_brotli(data, limit)
    else:
        raise InvalidArgument(
            f"Content-Encoding {encoding[:40]!r} is not supported; send gzip, deflate, br or no encoding"
        )
    d, out, view = new(), bytearray(), memoryview(data)
    try:
        # Fed in pieces, so what zlib keeps back (unconsumed_tail, a copy) stays small.
        for at in range(0, len(view), _FEED):
            piece = view[at : at + _FEED]
            while piece and not d.eof:
                out += d.decompress(piece, _INFLATE_CHUNK)
                if len(out) > limit:
                    raise BodyTooLarge(_too_large(len(out), limit, "it inflates to more than"))
                piece = d.unconsumed_tail
            if d.eof:
                break  # bytes after the stream are ignored, as aiohttp did
        if not d.eof:
            out += d.flush()  # what inflate may still hold back: less than one match
    except zlib.error as exc:
        raise InvalidArgument(f"the request body is not valid {coding}: {exc}") from None
    if len(out) > limit:
        raise BodyTooLarge(_too_large(len(out), limit, "it inflates to more than"))
    if not d.eof:
        raise InvalidArgument(f"the {coding} request body ends before its compressed stream does")
    return out


def _inflate_brotli(data: bytes, limit: int) -> bytearray:
    try:
        import brotli
    except ImportError:
        raise InvalidArgument("Content-Encoding br is not supported here; send gzip or deflate") from None
    d = brotli.Decompressor()
    out = bytearray()
    try:
        out += d.process(data, output_buffer_limit=_INFLATE_CHUNK)
        while len(out) <= limit and not d.is_finished() and not d.can_accept_more_data():
            out += d.process(b"", output_buffer_limit=_INFLATE_CHUNK)
    except brotli.error as exc:
        raise InvalidArgument(f"the request body is not valid br: {exc}") from None
    if len(out) > limit:
        raise BodyTooLarge(_too_large(len(out), limit, "it inflates to more than"))
    if not d.is_finished():
        raise InvalidArgument("the br request body ends before its compressed stream does")
    return out
