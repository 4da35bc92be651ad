"""What every gRPC servicer does around its method bodies, whatever the protocol.

`RpcHandler.handle` runs each call inside a `calls.Call` (request id from x-request-id or a new one,
trace span, outcome metrics under the servicer's protocol label, throttled logs: the same wrapper the
REST port uses) and maps its outcome to gRPC: a `ServingError` to its status, anything else to
INTERNAL with a fixed message, the request id in the trailer. A servicer's methods then only
translate messages: see servicer.py.

`tolerant(server)` is what a servicer is registered on: its request deserializers return a
`Malformed` marker instead of raising, so a message that does not parse reaches `handle`, which
answers INVALID_ARGUMENT, logs and counts it like any bad request (grpc would answer UNKNOWN with
the Python exception class, uncounted). Any protocol's servicer registered this way gets the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from fovea.server import calls, logs
from fovea.server.errors import InvalidArgument, ServingError, clip
from fovea.server.metrics import Metrics


class Malformed:
    """What a request message that does not parse deserializes to (see `tolerant`)."""

    __slots__ = ("message_type", "reason", "size")

    def __init__(self, message_type: str, reason: str, size: int) -> None:
        self.message_type = message_type
        self.reason = reason
        self.size = size


def _tolerant_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None
    message = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    message_type = message.full_name if message is not None else "request"

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, RecursionError (deep nesting), bad UTF-8, ...
            reason = str(exc).rsplit(": ", 1)[-1] if str(exc) else type(exc).__name__
            return Malformed(message_type, clip(reason, 80, quote=False), len(data))

    return parse


def _tolerant_handler(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    if handler is None or handler.request_streaming:
        return handler
    return handler._replace(request_deserializer=_tolerant_deserializer(handler.request_deserializer))


class _TolerantGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return _tolerant_handler(self._inner.service(handler_call_details))


def tolerant(server: grpc.aio.Server) -> _TolerantServer:
    """The server to hand a generated add_*_to_server: its unary request parsers never raise."""
    return _TolerantServer(server)


class _TolerantServer:
    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_TolerantGeneric(h) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, {name: _tolerant_handler(h) for name, h in handlers.items()}
        )


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
        metadata = context.invocation_metadata()
        call = calls.Call(self._metrics, self.protocol, self.service, method, _request_id(metadata), metadata)
        with call:
            trailer = ((logs.REQUEST_ID_HEADER, call.request_id),)
            try:
                if isinstance(request, Malformed):
                    raise InvalidArgument(
                        f"the request ({request.size} bytes) does not parse as {request.message_type}: "
                        f"{request.reason}"
                    )
                response = await fn(request, context)
                context.set_trailing_metadata(trailer)
                return response
            except ServingError as exc:
                await context.abort(grpc.StatusCode[exc.code], call.rejected(exc), trailer)
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                # gRPC's deadline timer may fire a hair before time_remaining() reaches zero.
                call.code = "DEADLINE_EXCEEDED" if remaining is not None and remaining < 0.05 else "CANCELLED"
                raise
            except grpc.aio.AbortError:
                raise
            except Exception:
                await context.abort(grpc.StatusCode.INTERNAL, call.failed(), trailer)


def deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as time.monotonic() seconds (what the core takes), None if it has none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _request_id(metadata: Sequence[tuple[str, Any]] | None) -> str:
    for key, value in metadata or ():
        if key == logs.REQUEST_ID_HEADER and value:
            return str(value)[:128]
    return logs.new_request_id()


def rpc_method(name: str, body: str) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """The servicer method for gRPC method `name`: runs the servicer's method `body` through its
    `RpcHandler` (`self._rpc`). One line per method in each servicer instead of one stub each."""

    async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._rpc.handle(name, getattr(self, body), request, context)

    call.__name__ = call.__qualname__ = name
    return call
