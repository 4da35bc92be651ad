"""KServe v2 / Open Inference Protocol over HTTP (aiohttp), on the server's own event loop.

A thin translation between JSON (plus Triton's binary tensor extension, which tritonclient.http and
`perf_analyzer -i http` use by default) and the transport-free v2 operations in v2.py. Errors are
JSON `{"error": message}` with the HTTP status of the error's gRPC code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import http_exceptions, web
from fovea.server import calls, http_body, logs, memory, v2
from fovea.server.errors import InvalidArgument, ResourceExhausted, ServingError, clip
from fovea.server.rollout import route_key

log = logging.getLogger(__name__)
# A repository-index body is `{"ready": true}`; more is refused before it is parsed.
INDEX_BODY_LIMIT = 64 * 1024
# Deeper JSON is refused before json.loads recurses into it (a UINT8 batch as nested lists is 7 deep).
MAX_JSON_DEPTH = 64
# aiohttp's own log lines ("Error handling request", a Content-Length that lies, a bad request line):
# through the throttle, and one line without a traceback when the client broke the protocol.
aiohttp_logger = logs.ThrottledLogger(
    logging.getLogger("fovea.server.http"),
    client_errors=(http_exceptions.HttpProcessingError, ConnectionError),
)

PROTOCOL = "v2-http"  # the `protocol` label of the request metrics
# The binary tensor extension: the JSON header's length when binary tensors follow it in the body.
HEADER_LENGTH = "Inference-Header-Content-Length"
REQUEST_ID = "X-Request-Id"
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 400,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "CANCELLED": 499,
    "INTERNAL": 500,
}


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status, content_type="application/json")


class V2Http:
    """The /v2 routes; `app()` builds the aiohttp application."""

    def __init__(
        self, ops: v2.V2, metrics: Any, max_body_bytes: int, max_bodies: int, body_timeout_s: float = 10.0
    ) -> None:
        self._v2 = ops
        self._metrics = metrics
        self._max_body = max_body_bytes
        # Requests whose body is arriving at the minimum rate, or is in and being served: at most
        # max_bodies (--max-concurrent-rpcs, as gRPC's calls), refused beyond it before anything is read;
        # slower bodies are held apart and timed out (http_body.py; docs/memory.md, "http").
        self.bodies = http_body.Bodies(max_bodies, body_timeout_s, max_body_bytes)
        # Bodies inflate and JSON parses one at a time, off the event loop: a parsed JSON tensor takes
        # up to ~40x its text (JSON_PARSE_FACTOR in memory.py) until it is packed into bytes, and
        # json.loads and zlib hold the GIL anyway, so two at once would not be faster.
        self._parser = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fovea-json")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body, middlewares=[_json_errors])
        model = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        routes = [
            web.get("/v2/health/live", self._wrap("ServerLive", self._live)),
            web.get("/v2/health/ready", self._wrap("ServerReady", self._ready)),
            web.get("/v2", self._wrap("ServerMetadata", self._server_metadata)),
            web.post("/v2/repository/index", self._wrap("RepositoryIndex", self._index)),
            web.get("/v2/models/stats", self._wrap("ModelStatistics", self._stats)),
        ]
        for prefix in (model, versioned):
            routes += [
                web.get(prefix, self._wrap("ModelMetadata", self._metadata)),
                web.get(prefix + "/ready", self._wrap("ModelReady", self._model_ready)),
                web.get(prefix + "/config", self._wrap("ModelConfig", self._config)),
                web.get(prefix + "/stats", self._wrap("ModelStatistics", self._stats)),
                web.post(prefix + "/infer", self._wrap("ModelInfer", self._infer)),
            ]
        app.add_routes(routes)
        return app

    def _wrap(
        self, method: str, fn: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            request_id = request.headers.get(REQUEST_ID) or logs.new_request_id()
            carrier = request.headers.items()  # traceparent, tracestate
            with calls.Call(self._metrics, PROTOCOL, PROTOCOL, method, request_id, carrier, "http") as call:
                try:
                    response = await fn(request)
                except ServingError as exc:
                    status = getattr(exc, "http_status", None) or HTTP_STATUS.get(exc.code, 500)
                    response = _json({"error": call.rejected(exc)}, status)
                    if status == 408:
                        response.force_close()  # a client this slow does not get to send the rest
                except web.HTTPException as exc:  # aiohttp's own refusals
                    kind = ResourceExhausted if exc.status == 413 else InvalidArgument
                    error = kind(exc.text or exc.reason)
                    response = _json({"error": call.rejected(error)}, exc.status)
                except (ConnectionError, http_exceptions.ContentLengthError):
                    # The client went away mid-body (ContentLengthError: it closed before sending what
                    # its Content-Length said): nobody is left to answer, and it is not a server error.
                    call.code = "CANCELLED"
                    response = _json({"error": "the client closed the connection"}, 499)
                    response.force_close()
                except http_exceptions.HttpProcessingError as exc:  # a malformed chunked body, say
                    response = _json(
                        {"error": call.rejected(InvalidArgument(f"bad request body: {exc}"))}, 400
                    )
                    response.force_close()
                except Exception:
                    response = _json({"error": call.failed()}, 500)
            response.headers[REQUEST_ID] = call.request_id
            return response

        return handle

    # -- health and metadata ---------------------------------------------------------------------

    async def _live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def _ready(self, request: web.Request) -> web.Response:
        # Slow bodies cannot fill the REST port (http_body.py), so the core's readiness is the port's.
        ready = self._v2.server_ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def _model_ready(self, request: web.Request) -> web.Response:
        ready = self._v2.model_ready(*_model(request))
        return _json({"name": request.match_info["model"], "ready": ready}, 200 if ready else 503)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return _json(self._v2.server_metadata())

    async def _metadata(self, request: web.Request) -> web.Response:
        m = self._v2.model_metadata(*_model(request))
        return _json(
            {
                "name": m.name,
                "versions": m.versions,
                "platform": m.platform,
                "inputs": [_spec(t) for t in m.inputs],
                "outputs": [_spec(t) for t in m.outputs],
                "properties": m.properties,
            }
        )

    async def _config(self, request: web.Request) -> web.Response:
        return _json(self._v2.model_config(*_model(request)))

    async def _stats(self, request: web.Request) -> web.Response:
        name, version = _model(request) if "model" in request.match_info else ("", "")
        return _json({"model_stats": self._v2.statistics(name, version)})

    async def _index(self, request: web.Request) -> web.Response:
        with self.bodies.slot() as arrival:
            data = await self.bodies.read(request, arrival, INDEX_BODY_LIMIT)
            body = _json_body(_decoded(request, data, INDEX_BODY_LIMIT))
        return _json(self._v2.repository_index(bool(body.get("ready", False))))

    # -- inference -------------------------------------------------------------------------------

    async def _infer(self, request: web.Request) -> web.Response:
        with self.bodies.slot() as arrival:
            body = await self.bodies.read(request, arrival)
            # Inflating and parsing are pure-Python or zlib work proportional to the body (up to the
            # message limit): off the event loop, so one large request does not stall other calls and health.
            infer_request, binary_outputs = await asyncio.get_running_loop().run_in_executor(
                self._parser, _parse_infer, request, body, self._max_body, self._max_body // memory.JSON_SHARE
            )
            del body  # binary tensors keep their part of it; a JSON body is packed into bytes by now
            infer_request.route_key = route_key(request.headers.items())
            result = await self._v2.infer(infer_request, None)
        response = _infer_response(result, binary_outputs)
        if "Accept-Encoding" in request.headers:
            # gzip or deflate when the client asks (tritonclient's response_compression_algorithm).
            response.enable_compression()
        return response


@web.middleware
async def _json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Unknown paths and methods get JSON errors too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json({"error": f"{exc.reason}: {request.method} {request.path[:128]}"}, exc.status)


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


def _spec(t: v2.TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}


def _decoded(request: web.Request, body: bytes, limit: int) -> bytes | bytearray:
    return http_body.inflate(body, request.headers.get("Content-Encoding", ""), limit)


def _parse_infer(
    request: web.Request, body: bytes, max_body: int, max_json: int
) -> tuple[v2.InferRequest, bool | set[str]]:
    """The v2 request a body holds; on the parse thread."""
    header, binary = _split_body(_decoded(request, body, max_body), request.headers.get(HEADER_LENGTH))
    if len(header) > max_json:
        raise InvalidArgument(
            f"the request's JSON is {len(header) / 2**20:.1f} MiB; at most {max_json / 2**20:.1f} MiB "
            f"(1/{memory.JSON_SHARE} of --max-message-mb) is parsed, since a JSON tensor takes up to "
            f"{memory.JSON_PARSE_FACTOR}x its size in memory: send tensors with the binary extension "
            f"({HEADER_LENGTH})"
        )
    return _infer_request(request, _json_body(header), binary)


def _split_body(body: bytes | bytearray, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return bytes(body) if isinstance(body, bytearray) else body, memoryview(b"")
    if not header_length.isdigit() or int(header_length) > len(body):
        raise InvalidArgument(
            f"{HEADER_LENGTH} is {header_length[:32]!r}; it must be the JSON header's length in bytes, at most "
            f"the body's {len(body)}"
        )
    n = int(header_length)
    return bytes(body[:n]), memoryview(body)[n:]


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _json_body(data: bytes) -> dict[str, Any]:
    depth = http_body.json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise InvalidArgument(
            f"the request's JSON is nested {depth} deep; at most {MAX_JSON_DEPTH} levels are parsed "
            "(a batch of images as nested lists is 7)"
        )
    try:
        # NaN and Infinity are Python's extensions, not JSON: refused here, not met as a tensor value.
        parsed = json.loads(data.decode("utf-8"), parse_constant=_no_constant) if data else {}
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return parsed


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, not {_kind(value)}")
    return value


def _string(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    """A JSON value's type, as a caller would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {clip(value, 24, quote=False)}"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _flatten(data: Any) -> list:
    if isinstance(data, list):
        out: list = []
        for item in data:
            out.extend(_flatten(item) if isinstance(item, list) else [item])
        return out
    return [data]


def _values(tensor: v2.Tensor, data: Any, what: str) -> None:
    """A JSON tensor's `data`, checked element by element for its datatype (on the parse thread, before
    anything is sized by them): UINT8 integers 0..255 are packed into bytes at once (the list of
    Python ints takes 8-40x the body's size), BYTES elements must be strings."""
    values = _flatten(data)
    if tensor.datatype == "UINT8":
        for i, v in enumerate(values):
            if type(v) is not int or not 0 <= v <= 255:
                raise InvalidArgument(
                    f"{what}.data[{i}] is {_kind(v)}; UINT8 data must be integers 0..255 (row-major, flat or nested)"
                )
        tensor.raw = np.asarray(values, dtype=np.uint8).tobytes() if values else b""
    elif tensor.datatype == "BYTES":
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise InvalidArgument(f"{what}.data[{i}] is {_kind(v)}; BYTES data must be strings")
        tensor.values = values
    else:
        tensor.values = values  # v2.py refuses the datatype with what the model expects


def _infer_request(
    request: web.Request, body: dict[str, Any], binary: memoryview
) -> tuple[v2.InferRequest, bool | set[str]]:
    """The v2 request, and which outputs go back as binary (True: all of them). Every field's type is
    checked here, so what reaches v2.py is what its rules expect."""
    name, version = _model(request)
    parameters = _object(body.get("parameters"), "parameters")
    inputs, at = [], 0
    items = body.get("inputs")
    if items is not None and not isinstance(items, list):
        raise InvalidArgument(f"inputs must be an array of tensors, not {_kind(items)}")
    for i, item in enumerate(items or ()):
        what = f"inputs[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument(f"{what} must be an object with name, datatype, shape and data")
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise InvalidArgument(f"{what}.shape must be an array of integers, not {_kind(shape)}")
        tensor = v2.Tensor(
            _string(item.get("name"), f"{what}.name"),
            _string(item.get("datatype"), f"{what}.datatype"),
            tuple(shape),
        )
        size = _object(item.get("parameters"), f"{what}.parameters").get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or at + size > len(binary):
                raise InvalidArgument(
                    f"{what}.parameters.binary_data_size is {clip(size, 24)}, but {len(binary) - at} binary "
                    "bytes remain"
                )
            tensor.raw = binary[at : at + size]
            at += size
        else:
            _values(tensor, item.get("data", []), what)
        inputs.append(tensor)
    outputs, binary_names = [], set()
    items = body.get("outputs")
    if items is not None and not isinstance(items, list):
        raise InvalidArgument(f"outputs must be an array of objects with a name, not {_kind(items)}")
    for i, item in enumerate(items or ()):
        if not isinstance(item, dict):
            raise InvalidArgument(f"outputs[{i}] must be an object with a name")
        params = _object(item.get("parameters"), f"outputs[{i}].parameters")
        k = params.get("classification", 0)
        if type(k) is not int:
            raise InvalidArgument(
                f"outputs[{i}].parameters.classification must be an integer, not {_kind(k)}"
            )
        outputs.append(v2.RequestedOutput(_string(item.get("name"), f"outputs[{i}].name"), k))
        if params.get("binary_data"):
            binary_names.add(outputs[-1].name)
    binary_outputs: bool | set[str] = binary_names
    if not outputs and parameters.get("binary_data_output"):
        binary_outputs = True
    infer = v2.InferRequest(
        model_name=name,
        model_version=version,
        inputs=inputs,
        outputs=outputs,
        id=_string(body.get("id"), "id"),
        parameters=parameters,
    )
    return infer, binary_outputs


def _infer_response(result: v2.InferResponse, binary_outputs: bool | set[str]) -> web.Response:
    header: dict[str, Any] = {"model_name": result.model_name, "model_version": result.model_version}
    if result.id:
        header["id"] = result.id
    outputs, blobs = [], []
    for out in result.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if out.parameters:
            entry["parameters"] = dict(out.parameters)
        if binary_outputs is True or (binary_outputs and out.name in binary_outputs):
            raw = out.raw()
            entry["parameters"] = {**entry.get("parameters", {}), "binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = out.values()
        outputs.append(entry)
    header["outputs"] = outputs
    encoded = json.dumps(header).encode()
    if not blobs:
        return web.Response(body=encoded, content_type="application/json")
    response = web.Response(body=b"".join([encoded, *blobs]), content_type="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(len(encoded))
    return response


def ssl_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    """The gRPC port's TLS settings for the REST port too (mTLS when a client CA is set)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
