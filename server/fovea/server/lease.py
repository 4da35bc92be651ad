"""One small primitive for "wait until nobody holds this": the core's drain and a version's leases.

A `Gate` counts holders. `enter()` admits one (unless the gate is closed), `exit()` lets one go, and
`wait_idle()` returns once the count is zero. The core closes its gate to drain for shutdown; a served
version's gate counts the requests that resolved it, so a retired version is released only after its
last request. Everything runs on the event loop: no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class GateClosed(Exception):
    """`enter()` on a closed gate: the owner is shutting down."""


class Gate:
    def __init__(self) -> None:
        self.count = 0
        self.closed = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        """Admit one holder; GateClosed once `close()` was called."""
        if self.closed:
            raise GateClosed
        self.count += 1
        self._idle.clear()

    def exit(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.exit()

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
