"""The one exception type of the client."""

from __future__ import annotations

import grpc


class FoveaError(Exception):
    """Any failure of a fovea client call.

    Raised for every RPC failure (carrying the server's or the channel's status code) and for bad
    input, which uses ``grpc.StatusCode.INVALID_ARGUMENT`` and is raised before any RPC is sent.

    Attributes:
        code: The gRPC status code, e.g. ``grpc.StatusCode.NOT_FOUND``.
        details: A human-readable message.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"

    def __repr__(self) -> str:
        return f"FoveaError({self.code}, {self.details!r})"


def invalid_argument(details: str) -> FoveaError:
    return FoveaError(grpc.StatusCode.INVALID_ARGUMENT, details)


def from_rpc_error(err: grpc.RpcError) -> FoveaError:
    """Convert what grpc raises (sync `grpc.Call` or `grpc.aio.AioRpcError`) into a FoveaError."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return FoveaError(code or grpc.StatusCode.UNKNOWN, details or "")
