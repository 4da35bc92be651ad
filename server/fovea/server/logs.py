"""Structured logging: text or JSON lines, each carrying the request id of the RPC that logged it."""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import sys
import time
import uuid
from typing import Any

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("fovea_request_id", default="-")

REQUEST_ID_HEADER = "x-request-id"


_PREFIX = uuid.uuid4().hex[:8]
_counter = itertools.count(1)


def new_request_id() -> str:
    """Unique per process run and cheap: a random per-process prefix and a counter."""
    return f"{_PREFIX}-{next(_counter)}"


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(log_format: str = "text", level: str = "INFO") -> None:
    """Route fovea's logs to stderr in the chosen format (replacing earlier fovea handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger("fovea")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


class Throttle:
    """At most `per_second` lines a second through `log`; the rest are counted and summarised.

    Rejected requests are logged through one of these, so a flood of bad input (a fuzzer wrote 10.7 MB
    of log, one line per request) costs a few lines a second plus "N more not logged".
    """

    def __init__(
        self,
        logger: logging.Logger,
        per_second: float = 10.0,
        clock=time.monotonic,
        what: str = "rejected requests",
    ) -> None:
        self._log = logger
        self._what = what
        self._per_second = per_second
        self._clock = clock
        self._window = clock()
        self._lines = 0
        self._suppressed = 0

    def log(self, level: int, msg: str, *args: object, **kwargs: Any) -> None:
        if not self._log.isEnabledFor(level):
            return
        now = self._clock()
        if now - self._window >= 1.0:
            if self._suppressed:
                self._log.log(level, "%d more %s were not logged", self._suppressed, self._what)
            self._window, self._lines, self._suppressed = now, 0, 0
        if self._lines >= self._per_second:
            self._suppressed += 1
            return
        self._lines += 1
        self._log.log(level, msg, *args, **kwargs)


class ThrottledLogger(logging.LoggerAdapter):
    """A logger whose every line goes through a `Throttle`: handed to aiohttp as its server logger, so
    its "Error handling request" lines (one traceback per malformed request: a Content-Length that
    lies, a bad request line) cost a few lines a second under a flood, as fovea's own rejections do.
    Protocol errors a client caused are one line without a traceback; anything else keeps its traceback.
    """

    def __init__(self, logger: logging.Logger, client_errors: tuple[type[BaseException], ...] = ()) -> None:
        super().__init__(logger, {})
        self._throttle = Throttle(logger, what="connection errors")
        self._client_errors = client_errors

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if exc is True:
            exc = sys.exc_info()[1]
        if isinstance(exc, self._client_errors):
            kwargs.pop("exc_info")
            level = min(level, logging.INFO)
            msg, args = f"{msg}: %s: %s", (*args, type(exc).__name__, " ".join(str(exc).split())[:200])
        self._throttle.log(level, str(msg), *args, **kwargs)
