"""What every gRPC servicer does around its method bodies, whatever the protocol.

`RpcHandler.handle` sets the request id (from x-request-id, or a new one) for the logs and the
trailer, maps a `ServingError` to its gRPC status, turns anything else into INTERNAL with a fixed
message (the traceback goes to the log), and counts the outcome in fovea_requests_total and
fovea_request_duration_seconds under the servicer's protocol label, and traces it (tracing.py). A servicer's methods then only
translate messages: see servicer.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
from fovea.server import logs, tracing
from fovea.server.errors import INTERNAL_MESSAGE, ServingError
from fovea.server.metrics import Metrics

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")


class RpcHandler:
    def __init__(self, metrics: Metrics, protocol: str, methods: Sequence[str], service: str = "") -> None:
        self._metrics = metrics
        self.protocol = protocol
        self.service = service or protocol  # the gRPC service's full name, for trace span names
        # Created up front, so every method's histogram is exported (at zero) before its first call.
        self._durations = {m: metrics.request_duration.labels(protocol, m) for m in methods}

    async def handle(
        self,
        method: str,
        fn: Callable[[Request, grpc.aio.ServicerContext], Awaitable[Response]],
        request: Request,
        context: grpc.aio.ServicerContext,
    ) -> Response:
        request_id = _request_id(context)
        token = logs.request_id.set(request_id)
        # The RPC's trace span (a no-op unless OTEL_* turned tracing on), child of the caller's traceparent.
        span = tracing.start_server_span(self.service, method, context.invocation_metadata())
        start = time.perf_counter()
        code = "OK"
        trailer = ((logs.REQUEST_ID_HEADER, request_id),)
        try:
            response = await fn(request, context)
            context.set_trailing_metadata(trailer)
            return response
        except ServingError as exc:
            code = exc.code
            level = logging.WARNING if code in ("INTERNAL", "RESOURCE_EXHAUSTED") else logging.INFO
            log.log(level, "%s: %s: %s", method, code, exc.message)
            await context.abort(grpc.StatusCode[code], exc.message, trailer)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            # gRPC's deadline timer may fire a hair before time_remaining() reaches zero.
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining < 0.05 else "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = "INTERNAL"
            log.exception("%s failed", method)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"{INTERNAL_MESSAGE} (request id {request_id})", trailer
            )
        finally:
            self._metrics.requests.labels(self.protocol, method, code).inc()
            self._durations[method].observe(time.perf_counter() - start)
            span.finish(code)
            logs.request_id.reset(token)


def deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as time.monotonic() seconds (what the core takes), None if it has none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == logs.REQUEST_ID_HEADER and value:
            return str(value)[:128]
    return logs.new_request_id()
