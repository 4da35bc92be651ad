"""What every transport does around one request: request id, trace span, outcome metrics, throttled logs.

gRPC (rpc.py, every servicer) and REST (v2_http.py) both run each request inside a `Call`, so the
two ports count, trace and log alike: a `ServingError` is its code and its message; anything else is
INTERNAL with a fixed message carrying the request id (the traceback goes to the log); a caller that
went away is CANCELLED. The transport only turns the code and message into its own answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from fovea.server import logs, tracing
from fovea.server.errors import INTERNAL_MESSAGE, MESSAGE_LIMIT, ServingError, clip

log = logging.getLogger(__name__)
# Rejected requests (bad input, unknown models, shedding) are routine under abuse or overload, and so
# are the rare unexpected failures a fuzzer can provoke by the thousand: a few lines a second, of every
# transport together, not one per request.
_throttle = logs.Throttle(log)
# Unexpected failures have a throttle of their own: a flood of rejected requests must not hide the
# traceback of a server bug (the rejections of one test used up the shared budget of the next).
_failures = logs.Throttle(log, what="unexpected failures")

# Codes a caller causes; the rest are logged as warnings.
_QUIET = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE"})


class Call:
    """One request, from its arrival to its answer (a context manager around the handler)."""

    def __init__(
        self,
        metrics: Any,
        protocol: str,
        service: str,
        method: str,
        request_id: str,
        carrier: Iterable[tuple[str, Any]] | None = None,
        system: str = "grpc",
    ) -> None:
        self._metrics = metrics
        self.protocol = protocol
        self.service = service
        self.method = method
        self.request_id = request_id[:128]
        self._carrier = carrier
        self._system = system
        self.code = "OK"

    def __enter__(self) -> Call:
        self._token = logs.request_id.set(self.request_id)
        # The request's trace span (a no-op unless OTEL_* turned tracing on), child of the caller's traceparent.
        self._span = tracing.start_server_span(self.service, self.method, self._carrier, self._system)
        self._start = time.perf_counter()
        return self

    def rejected(self, exc: ServingError) -> str:
        """A refusal with its code: logged (throttled), and its message, cut short, to send back."""
        self.code = exc.code
        message = clip(exc.message, MESSAGE_LIMIT, quote=False)
        level = logging.INFO if self.code in _QUIET else logging.WARNING
        _throttle.log(
            level, "%s %s: %s: %s", self.protocol, self.method, self.code, clip(message, 300, quote=False)
        )
        return message

    def failed(self) -> str:
        """An unexpected exception (call from its `except`): INTERNAL, logged with its traceback."""
        self.code = "INTERNAL"
        _failures.log(logging.ERROR, "%s %s failed", self.protocol, self.method, exc_info=True)
        return f"{INTERNAL_MESSAGE} (request id {self.request_id})"

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None and self.code == "OK" and not issubclass(exc_type, Exception):
            # Cancelled: the caller went away (a transport that can tell sets DEADLINE_EXCEEDED first).
            self.code = "CANCELLED"
        self._metrics.request_counts(self.protocol, self.method, self.code).inc()
        self._metrics.request_durations(self.protocol, self.method).observe(time.perf_counter() - self._start)
        self._span.finish(self.code)
        logs.request_id.reset(self._token)
