"""Deadlines and retries: exponential backoff with full jitter, never past the caller's deadline."""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from fovea.client._errors import FoveaError, from_rpc_error, invalid_argument

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries calls that failed with UNAVAILABLE or RESOURCE_EXHAUSTED.

    The n-th retry waits a uniformly random time in ``[0, min(max_backoff, initial_backoff *
    multiplier**n)]`` seconds ("full jitter"), so many clients do not retry in lock-step. Retries
    stop at the call's deadline, whatever the policy says; a wait is cut short at the deadline.

    Attributes:
        initial_backoff: The cap of the first wait, in seconds.
        max_backoff: The largest cap of any wait, in seconds.
        multiplier: How fast the cap grows per attempt.
        max_attempts: The most attempts per RPC (first try included); ``None`` means "as many as
            fit before the deadline". ``1`` disables retries.
        fail_fast_unreachable: When the first attempt of a call cannot connect at all (connection
            refused, unknown host, TLS handshake failed), raise UNAVAILABLE "cannot connect: <reason>"
            at once instead of retrying until the deadline (the CLI sets this: a wrong --target should
            not take 10 s). Connection failures after something answered are still retried.
        fail_fast_no_model: When the server answers that it has no model loaded at all (its model
            folder holds no published version), raise at once instead of retrying until the deadline
            (the CLI sets this). A model whose version is still loading is retried as usual.
    """

    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    max_attempts: int | None = None
    fail_fast_unreachable: bool = False
    fail_fast_no_model: bool = False

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** min(retry, 64))
        return (rng or random).uniform(0.0, cap)


class Deadline:
    """An absolute point in monotonic time that all attempts and sub-requests of one call share."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._end = time.monotonic() + timeout

    def remaining(self) -> float:
        return self._end - time.monotonic()


def resolve_timeout(timeout: float | None, default: float) -> float:
    """Validate a timeout argument; ``None`` means the client's default (never "forever")."""
    value = default if timeout is None else timeout
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid_argument(f"timeout must be a number of seconds, not {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise invalid_argument(f"timeout must be a positive, finite number of seconds, not {value!r}")
    return float(value)


# How grpc reports a TLS handshake that failed (an untrusted server certificate, TLS against a
# plaintext port): UNAVAILABLE, like an outage, but retrying cannot fix it. An mTLS server refusing a
# client without a certificate (TLS 1.3) only shows as "Socket closed" right after the handshake, so a
# TLS client without a certificate that sees it twice in a row gives up the same way.
_TLS_FAILURE = re.compile(r"handshake|SSL_ERROR|TSI_|CERTIFICATE_VERIFY", re.IGNORECASE)
_CLOSED = "Socket closed"


def tls_failure(
    err: FoveaError, attempts: int = 1, tls_without_client_cert: bool = False
) -> FoveaError | None:
    """A clear, non-retryable error when `err` is (very likely) a TLS handshake failure, else None."""
    if err.code != grpc.StatusCode.UNAVAILABLE:
        return None
    refused = tls_without_client_cert and attempts >= 2 and _CLOSED in err.details
    if not (_TLS_FAILURE.search(err.details) or refused):
        return None
    return FoveaError(
        grpc.StatusCode.UNAVAILABLE,
        "TLS handshake with the server failed: the server may require a client certificate (mTLS: pass "
        "certificate_chain and private_key), or the certificates are not trusted by the other side "
        f"(root_certificates); not retried. gRPC said: {err.details}",
    )


# How grpc reports a plain HTTP/1.x server at the target (fovea serve's REST port, a web server):
# the connection works, the protocol does not, so retrying cannot help.
_HTTP1 = re.compile(r"http1\.x server|parsing http/2|expected settings frame", re.IGNORECASE)
# What a fovea server answers while no model at all is loaded (manager.py).
NO_MODEL = "no model is loaded yet"


def http1_failure(err: FoveaError) -> FoveaError | None:
    """A clear, non-retryable error when the target answered in HTTP/1.x instead of gRPC, else None."""
    if err.code != grpc.StatusCode.UNAVAILABLE or not _HTTP1.search(err.details):
        return None
    return FoveaError(
        grpc.StatusCode.UNAVAILABLE,
        "cannot connect: it answers HTTP/1.x, not gRPC: that is likely the REST port (fovea serve's "
        "default 8080); gRPC is on --port, 8500 by default; not retried. "
        f"gRPC said: {err.details}",
    )


def no_model_failure(err: FoveaError) -> FoveaError | None:
    """A clear error when the server says it has no model loaded at all, else None."""
    if err.code != grpc.StatusCode.UNAVAILABLE or NO_MODEL not in err.details:
        return None
    return FoveaError(
        grpc.StatusCode.UNAVAILABLE,
        "the server has no model loaded: its --model-dir holds no published version yet (its log says "
        "why; `fovea models` lists what it serves); not retried",
    )


def _retryable(err: FoveaError) -> bool:
    if err.code not in RETRYABLE_CODES:
        return False
    # grpc reports an oversized message as RESOURCE_EXHAUSTED too; resending it cannot help.
    return "larger than max" not in err.details


# What grpc says when no connection could be made (no server answered).
_CONNECT_FAILURES = (
    "failed to connect",
    "connections to all backends failing",
    "dns resolution failed",
    "errors resolving",
)


def unreachable_reason(err: FoveaError) -> str | None:
    """The last reason in `err` ("connection refused") when it says nothing could be connected to."""
    if err.code != grpc.StatusCode.UNAVAILABLE:
        return None
    if not any(marker in err.details.lower() for marker in _CONNECT_FAILURES):
        return None
    return err.details.rsplit(": ", 1)[-1].strip(" []").lower()


def _give_up(last: FoveaError, attempts: int, deadline: Deadline) -> FoveaError:
    return FoveaError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"deadline of {deadline.timeout:g} s exceeded after {attempts} attempt(s); last error: {last}",
    )


def _expired(last: FoveaError | None, attempts: int, deadline: Deadline) -> FoveaError:
    if last is None:
        return FoveaError(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline of {deadline.timeout:g} s exceeded")
    return _give_up(last, attempts, deadline)


def _failure(err: FoveaError, last: FoveaError | None, attempts: int, deadline: Deadline) -> FoveaError:
    # A retry that ran out of time reports why it was retrying, not just "Deadline Exceeded".
    if err.code == grpc.StatusCode.DEADLINE_EXCEEDED and last is not None:
        return _give_up(last, attempts, deadline)
    return err


def _next_wait(
    policy: RetryPolicy, err: FoveaError, attempts: int, deadline: Deadline, tls_without_client_cert: bool
) -> float:
    """Seconds to wait before the next attempt, or raise if there is no next attempt."""
    tls = tls_failure(err, attempts, tls_without_client_cert)
    if tls is not None:
        raise tls
    http1 = http1_failure(err)
    if http1 is not None:
        raise http1
    if policy.fail_fast_no_model and no_model_failure(err) is not None:
        raise no_model_failure(err)
    if not _retryable(err):
        raise err
    if policy.fail_fast_unreachable and attempts == 1:
        reason = unreachable_reason(err)
        if reason is not None:
            raise FoveaError(grpc.StatusCode.UNAVAILABLE, f"cannot connect: {reason}")
    if policy.max_attempts is not None and attempts >= policy.max_attempts:
        raise err
    remaining = deadline.remaining()
    if remaining <= 0:
        raise _give_up(err, attempts, deadline)
    # Never sleep past the deadline; the loop then gives up with this error.
    return min(policy.backoff(attempts - 1), remaining)


class _Attempts:
    """What both retry loops keep between attempts: how many were made and the last error."""

    def __init__(self, deadline: Deadline, policy: RetryPolicy, tls_without_client_cert: bool) -> None:
        self._deadline, self._policy = deadline, policy
        self._tls_without_client_cert = tls_without_client_cert
        self._count = 0
        self._last: FoveaError | None = None

    def timeout(self) -> float:
        """The next attempt's gRPC timeout: the time left until the deadline; raise if none is."""
        remaining = self._deadline.remaining()
        if remaining <= 0:
            raise _expired(self._last, self._count, self._deadline)
        self._count += 1
        return remaining

    def wait(self, exc: grpc.RpcError) -> float:
        """Seconds to wait after the failed attempt, or raise if there is no next attempt."""
        err = _failure(from_rpc_error(exc), self._last, self._count, self._deadline)
        wait = _next_wait(self._policy, err, self._count, self._deadline, self._tls_without_client_cert)
        self._last = err
        return wait


def call_with_retry(
    attempt: Callable[[float], T],
    deadline: Deadline,
    policy: RetryPolicy,
    tls_without_client_cert: bool = False,
) -> T:
    """Run ``attempt(timeout_seconds)`` until it succeeds, fails for good, or the deadline passes.

    Every attempt gets the time left until the deadline as its gRPC timeout. A TLS handshake failure
    is not retried (see `tls_failure`).
    """
    attempts = _Attempts(deadline, policy, tls_without_client_cert)
    while True:
        timeout = attempts.timeout()
        try:
            return attempt(timeout)
        except grpc.RpcError as exc:
            failed = exc  # raised on from outside the handler, so the FoveaError is not chained to it
        time.sleep(attempts.wait(failed))


async def call_with_retry_async(
    attempt: Callable[[float], Awaitable[T]],
    deadline: Deadline,
    policy: RetryPolicy,
    tls_without_client_cert: bool = False,
) -> T:
    """The asyncio twin of `call_with_retry`."""
    attempts = _Attempts(deadline, policy, tls_without_client_cert)
    while True:
        timeout = attempts.timeout()
        try:
            return await attempt(timeout)
        except grpc.RpcError as exc:
            failed = exc
        await asyncio.sleep(attempts.wait(failed))
