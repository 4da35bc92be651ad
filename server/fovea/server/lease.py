"""The one in-flight counter: "how many hold this", and "wait until nobody does".

A `Gate` counts holders. `enter(n)` admits n (unless the gate is closed), `exit(n)` lets them go,
`held(n)` does both around a block and hands back a `Held` that may give its part back early, and
`wait_idle()` returns once the count is zero. The core's gate counts its predictions (closed to drain
for shutdown) and the encoded images waiting to be decoded (the decode queue); a served version's
gate counts the requests that resolved it, so a retired version is released only after its last
request. Everything runs on the event loop: no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class GateClosed(Exception):
    """`enter()` on a closed gate: the owner is shutting down."""


class Held:
    """Part of a `Gate`'s count, given back once: at `release()` or at the end of its block."""

    __slots__ = ("_gate", "_n")

    def __init__(self, gate: Gate, n: int) -> None:
        self._gate, self._n = gate, n

    def release(self) -> None:
        if self._n:
            n, self._n = self._n, 0
            self._gate.exit(n)


class Gate:
    def __init__(self) -> None:
        self.count = 0
        self.closed = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self, n: int = 1) -> None:
        """Admit `n` holders; GateClosed once `close()` was called."""
        if self.closed:
            raise GateClosed
        self.count += n
        if self.count:
            self._idle.clear()

    def exit(self, n: int = 1) -> None:
        self.count -= n
        if self.count == 0:
            self._idle.set()

    @contextlib.contextmanager
    def held(self, n: int = 1) -> Iterator[Held]:
        self.enter(n)
        held = Held(self, n)
        try:
            yield held
        finally:
            held.release()

    def close(self) -> None:
        """Refuse new holders; the current ones finish."""
        self.closed = True

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no one holds the gate; False if `timeout` seconds passed first."""
        if self.count == 0:
            return True  # also with timeout 0, which asyncio.wait_for would call expired
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            return False
