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
