"""Errors the core raises, each carrying the gRPC status code name a transport maps it to.

The code is a plain string (a `grpc.StatusCode` member name) so the core never imports grpc; other
transports (KServe v2 over HTTP, say) map the same names to their own statuses.
"""

from __future__ import annotations


class ServingError(Exception):
    """A failure whose message is safe and useful to show to the caller."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServingError):
    """The request is malformed; the message says what to change."""

    code = "INVALID_ARGUMENT"


class NotFound(ServingError):
    """The named model or version is not served."""

    code = "NOT_FOUND"


class FailedPrecondition(ServingError):
    """The request is valid but the server's state cannot serve it (a label naming an unloaded version)."""

    code = "FAILED_PRECONDITION"


class Unavailable(ServingError):
    """Not ready, or draining for shutdown: retry elsewhere or later."""

    code = "UNAVAILABLE"


class ResourceExhausted(ServingError):
    """The queue is full: the request was shed."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServingError):
    """The caller's deadline passed before the request was computed."""

    code = "DEADLINE_EXCEEDED"


INTERNAL_MESSAGE = "internal error; the server log has the details"


ECHO_LIMIT = 64  # characters of a caller's value (a name, a path) repeated in a message or a log line
MESSAGE_LIMIT = 1024  # characters of a status message: far below gRPC's 16 KiB metadata limit


def clip(value: object, limit: int = ECHO_LIMIT, quote: bool = True) -> str:
    """`repr(value)` (or `str` without `quote`) cut to `limit` characters, saying how long it was.

    Every value a caller sent, or storage named, goes through this before a message or a log line.
    A 20,000-character model name repeated whole made a NOT_FOUND message overflow gRPC's metadata
    limit (the caller saw RESOURCE_EXHAUSTED and retried), and filled the log.
    """
    text = repr(value) if quote else str(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, (str, bytes)) else f"{len(text)} characters shown"
    return f"{text[: limit - 1]}… ({size})"
