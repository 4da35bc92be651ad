"""KServe v2 / Open Inference Protocol over HTTP (aiohttp), on the server's own event loop.

A thin translation between JSON (plus Triton's binary tensor extension, which tritonclient.http and
`perf_analyzer -i http` use by default) and the transport-free v2 operations in v2.py. Errors are
JSON `{"error": message}` with the HTTP status of the error's gRPC code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import numpy as np
from aiohttp import web
from fovea.server import logs, memory, v2
from fovea.server.errors import INTERNAL_MESSAGE, InvalidArgument, ResourceExhausted, ServingError, clip

log = logging.getLogger(__name__)
# Rejections are logged a few a second at most, as the gRPC servicers' are (rpc.py).
_rejections = logs.Throttle(log)
# A repository-index body is `{"ready": true}`; more is refused before it is parsed on the loop.
INDEX_BODY_LIMIT = 64 * 1024

PROTOCOL = "v2-http"  # the `protocol` label of the request metrics
# The binary tensor extension: the JSON header's length when binary tensors follow it in the body.
HEADER_LENGTH = "Inference-Header-Content-Length"
REQUEST_ID = "X-Request-Id"
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
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

    def __init__(self, ops: v2.V2, metrics: Any, max_body_bytes: int, max_bodies: int) -> None:
        self._v2 = ops
        self._metrics = metrics
        self._max_body = max_body_bytes
        # Requests whose body is being read or served: at most max_bodies (--max-concurrent-rpcs, as
        # gRPC's calls), refused beyond it before anything is read (docs/memory.md, "http").
        self._max_bodies = max_bodies
        self._bodies = 0
        # JSON bodies parse one at a time: a parsed JSON tensor takes up to ~40x its text
        # (JSON_PARSE_FACTOR in memory.py) until it is packed into bytes, and json.loads holds
        # the GIL anyway, so parsing two at once would not be faster.
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
            request_id = (request.headers.get(REQUEST_ID) or logs.new_request_id())[:128]
            token = logs.request_id.set(request_id)
            start = time.perf_counter()
            code = "OK"
            try:
                response = await fn(request)
            except ServingError as exc:
                code = exc.code
                level = logging.WARNING if code in ("INTERNAL", "RESOURCE_EXHAUSTED") else logging.INFO
                _rejections.log(
                    level, "%s %s: %s: %s", PROTOCOL, method, code, clip(exc.message, 300, quote=False)
                )
                response = _json({"error": exc.message}, HTTP_STATUS.get(code, 500))
            except web.HTTPException as exc:  # aiohttp's own refusals, such as a body over the limit
                code = "RESOURCE_EXHAUSTED" if exc.status == 413 else "INVALID_ARGUMENT"
                _rejections.log(logging.INFO, "%s %s: HTTP %d: %s", PROTOCOL, method, exc.status, exc.text)
                response = _json({"error": exc.text or exc.reason}, exc.status)
            except asyncio.CancelledError:
                code = "CANCELLED"  # the caller went away
                raise
            except Exception:
                code = "INTERNAL"
                log.exception("%s %s failed", PROTOCOL, method)
                response = _json({"error": f"{INTERNAL_MESSAGE} (request id {request_id})"}, 500)
            finally:
                self._metrics.requests.labels(PROTOCOL, method, code).inc()
                self._metrics.request_duration.labels(PROTOCOL, method).observe(time.perf_counter() - start)
                logs.request_id.reset(token)
            response.headers[REQUEST_ID] = request_id
            return response

        return handle

    # -- health and metadata ---------------------------------------------------------------------

    async def _live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def _ready(self, request: web.Request) -> web.Response:
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
        with self._body():
            data = await request.content.read(INDEX_BODY_LIMIT + 1)
            if len(data) > INDEX_BODY_LIMIT:
                raise web.HTTPRequestEntityTooLarge(max_size=INDEX_BODY_LIMIT, actual_size=len(data))
            body = _json_body(data)
        return _json(self._v2.repository_index(bool(body.get("ready", False))))

    @contextlib.contextmanager
    def _body(self) -> Iterator[None]:
        if self._bodies >= self._max_bodies:
            raise ResourceExhausted(
                f"server overloaded: {self._bodies} HTTP requests already in flight (--max-concurrent-rpcs "
                f"{self._max_bodies}); retry with backoff or on another replica"
            )
        self._bodies += 1
        try:
            yield
        finally:
            self._bodies -= 1

    # -- inference -------------------------------------------------------------------------------

    async def _infer(self, request: web.Request) -> web.Response:
        with self._body():
            body = await request.read()
            # Parsing a JSON tensor is pure-Python work proportional to the body (up to the message
            # limit): off the event loop, so one large request does not stall other calls and health.
            infer_request, binary_outputs = await asyncio.get_running_loop().run_in_executor(
                self._parser, _parse_infer, request, body, self._max_body // memory.JSON_SHARE
            )
            del body  # binary tensors keep their part of it; a JSON body is packed into bytes by now
            result = await self._v2.infer(infer_request, None)
        response = _infer_response(result, binary_outputs)
        if "Accept-Encoding" in request.headers:
            # gzip or deflate when the client asks (tritonclient's response_compression_algorithm);
            # aiohttp also undoes a request's Content-Encoding before we read the body.
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


def _parse_infer(request: web.Request, body: bytes, max_json: int) -> tuple[v2.InferRequest, bool | set[str]]:
    header, binary = _split_body(body, request.headers.get(HEADER_LENGTH))
    if len(header) > max_json:
        raise InvalidArgument(
            f"the request's JSON is {len(header) / 2**20:.1f} MiB; at most {max_json / 2**20:.1f} MiB "
            f"(1/{memory.JSON_SHARE} of --max-message-mb) is parsed, since a JSON tensor takes up to "
            f"{memory.JSON_PARSE_FACTOR}x its size in memory: send tensors with the binary extension "
            f"({HEADER_LENGTH})"
        )
    return _infer_request(request, _json_body(header), binary)


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.isdigit() or int(header_length) > len(body):
        raise InvalidArgument(
            f"{HEADER_LENGTH} is {header_length[:32]!r}; it must be the JSON header's length in bytes, at most "
            f"the body's {len(body)}"
        )
    n = int(header_length)
    return body[:n], memoryview(body)[n:]


def _json_body(data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(data) if data else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return parsed


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _flatten(data: Any) -> list:
    if isinstance(data, list):
        out: list = []
        for item in data:
            out.extend(_flatten(item) if isinstance(item, list) else [item])
        return out
    return [data]


def _pack_uint8(tensor: v2.Tensor) -> None:
    """A UINT8 tensor's JSON values as bytes, when they are all integers in 0..255: the list of Python
    ints takes 8-40x the body's size and would stay alive until the request is answered. Anything
    else is left as it is, for v2.py to refuse with its usual message."""
    if tensor.datatype != "UINT8" or not tensor.values:
        return
    if not all(type(v) is int for v in tensor.values):
        return
    try:
        array = np.asarray(tensor.values, dtype=np.int64)
    except (OverflowError, ValueError):
        return
    if array.min() < 0 or array.max() > 255:
        return
    tensor.raw, tensor.values = array.astype(np.uint8).tobytes(), None


def _infer_request(
    request: web.Request, body: dict[str, Any], binary: memoryview
) -> tuple[v2.InferRequest, bool | set[str]]:
    """The v2 request, and which outputs go back as binary (True: all of them)."""
    name, version = _model(request)
    parameters = _object(body.get("parameters"), "parameters")
    inputs, at = [], 0
    for i, item in enumerate(body.get("inputs") or ()):
        if not isinstance(item, dict):
            raise InvalidArgument(f"inputs[{i}] must be an object with name, datatype, shape and data")
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise InvalidArgument(f"inputs[{i}].shape must be a list of integers")
        tensor = v2.Tensor(str(item.get("name", "")), str(item.get("datatype", "")), tuple(shape))
        size = _object(item.get("parameters"), f"inputs[{i}].parameters").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(binary):
                raise InvalidArgument(
                    f"inputs[{i}].parameters.binary_data_size is {size!r}, but {len(binary) - at} binary bytes remain"
                )
            tensor.raw = binary[at : at + size]
            at += size
        else:
            tensor.values = _flatten(item.get("data", []))
            _pack_uint8(tensor)
        inputs.append(tensor)
    outputs, binary_names = [], set()
    for i, item in enumerate(body.get("outputs") or ()):
        if not isinstance(item, dict):
            raise InvalidArgument(f"outputs[{i}] must be an object with a name")
        params = _object(item.get("parameters"), f"outputs[{i}].parameters")
        k = params.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int):
            raise InvalidArgument(f"outputs[{i}].parameters.classification must be an integer")
        outputs.append(v2.RequestedOutput(str(item.get("name", "")), k))
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
        id=str(body.get("id", "")),
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
