"""One gRPC call's handling for every servicer: request id, status mapping, outcome metrics, logging.

(Interim home until the core refactor's shared helper lands on main; the v2 and TF Serving servicers
call it as `await handler(method, fn, context)`.)
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from fovea.server import logs
from fovea.server.errors import INTERNAL_MESSAGE, ServingError

log = logging.getLogger(__name__)


class Handler:
    def __init__(self, metrics: Any, protocol: str) -> None:
        self._metrics = metrics
        self._protocol = protocol

    async def __call__(self, method: str, fn: Callable[[], Any], context: grpc.aio.ServicerContext) -> Any:
        request_id = _request_id(context)
        token = logs.request_id.set(request_id)
        start = time.perf_counter()
        code = "OK"
        trailer = ((logs.REQUEST_ID_HEADER, request_id),)
        try:
            response = fn()
            if inspect.isawaitable(response):
                response = await response
            context.set_trailing_metadata(trailer)
            return response
        except ServingError as exc:
            code = exc.code
            level = logging.WARNING if code in ("INTERNAL", "RESOURCE_EXHAUSTED") else logging.INFO
            log.log(level, "%s %s: %s: %s", self._protocol, method, code, exc.message)
            await context.abort(grpc.StatusCode[code], exc.message, trailer)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining < 0.05 else "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = "INTERNAL"
            log.exception("%s %s failed", self._protocol, method)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"{INTERNAL_MESSAGE} (request id {request_id})", trailer
            )
        finally:
            self._metrics.requests.labels(method, code).inc()
            self._metrics.request_duration.labels(method).observe(time.perf_counter() - start)
            logs.request_id.reset(token)


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == logs.REQUEST_ID_HEADER and value:
            return str(value)[:128]
    return logs.new_request_id()
