"""Deadlines and retries: exponential backoff with full jitter, never past the caller's deadline."""

from __future__ import annotations

import asyncio
import math
import random
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
    """

    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    max_attempts: int | None = None
    fail_fast_unreachable: bool = False

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


def _next_wait(policy: RetryPolicy, err: FoveaError, attempts: int, deadline: Deadline) -> float:
    """Seconds to wait before the next attempt, or raise if there is no next attempt."""
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


def call_with_retry(attempt: Callable[[float], T], deadline: Deadline, policy: RetryPolicy) -> T:
    """Run ``attempt(timeout_seconds)`` until it succeeds, fails for good, or the deadline passes.

    Every attempt gets the time left until the deadline as its gRPC timeout.
    """
    attempts, last = 0, None
    while True:
        remaining = deadline.remaining()
        if remaining <= 0:
            raise _expired(last, attempts, deadline)
        attempts += 1
        try:
            return attempt(remaining)
        except grpc.RpcError as exc:
            err = _failure(from_rpc_error(exc), last, attempts, deadline)
        time.sleep(_next_wait(policy, err, attempts, deadline))
        last = err


async def call_with_retry_async(
    attempt: Callable[[float], Awaitable[T]], deadline: Deadline, policy: RetryPolicy
) -> T:
    """The asyncio twin of `call_with_retry`."""
    attempts, last = 0, None
    while True:
        remaining = deadline.remaining()
        if remaining <= 0:
            raise _expired(last, attempts, deadline)
        attempts += 1
        try:
            return await attempt(remaining)
        except grpc.RpcError as exc:
            err = _failure(from_rpc_error(exc), last, attempts, deadline)
        await asyncio.sleep(_next_wait(policy, err, attempts, deadline))
        last = err
