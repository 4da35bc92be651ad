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

from aiohttp import http_exceptions, web
from fovea.server import calls, http_body, json_process, logs, memory, v2, v2_json
from fovea.server.errors import InvalidArgument, ResourceExhausted, ServingError
from fovea.server.rollout import route_key

log = logging.getLogger(__name__)
# A repository-index body is `{"ready": true}`; more is refused before it is parsed.
INDEX_BODY_LIMIT = 64 * 1024
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
        # json.loads holds the GIL for the whole parse: large JSON goes to one child process instead
        # (json_process.py), called only from that thread, so one message at a time.
        self.json = json_process.JsonParser()

    def close(self) -> None:
        """Stop the parse thread and the parse process (the server's stop, after the port closed)."""
        self._parser.shutdown(wait=True, cancel_futures=True)
        self.json.close()

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
            body = v2_json.json_body(_decoded(request, data, INDEX_BODY_LIMIT))
        return _json(self._v2.repository_index(bool(body.get("ready", False))))

    # -- inference -------------------------------------------------------------------------------

    async def _infer(self, request: web.Request) -> web.Response:
        with self.bodies.slot() as arrival:
            body = await self.bodies.read(request, arrival)
            # Inflating and parsing are pure-Python or zlib work proportional to the body (up to the
            # message limit): off the event loop, so one large request does not stall other calls and health.
            infer_request, binary_outputs = await asyncio.get_running_loop().run_in_executor(
                self._parser,
                _parse_infer,
                request,
                body,
                self._max_body,
                self._max_body // memory.JSON_SHARE,
                self.json,
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
    request: web.Request, body: bytes, max_body: int, max_json: int, parser: json_process.JsonParser
) -> tuple[v2.InferRequest, bool | set[str]]:
    """The v2 request a body holds; on the parse thread (its JSON, when large, in the parse process)."""
    header, binary = _split_body(_decoded(request, body, max_body), request.headers.get(HEADER_LENGTH))
    if len(header) > max_json:
        raise InvalidArgument(
            f"the request's JSON is {len(header) / 2**20:.1f} MiB; at most {max_json / 2**20:.1f} MiB "
            f"(1/{memory.JSON_SHARE} of --max-message-mb) is parsed, since a JSON tensor takes up to "
            f"{memory.JSON_PARSE_FACTOR}x its size in memory: send tensors with the binary extension "
            f"({HEADER_LENGTH})"
        )
    return _infer_request(request, parser.parse(header, len(binary)), binary)


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


def _infer_request(
    request: web.Request, parsed: v2_json.JsonInfer, binary: memoryview
) -> tuple[v2.InferRequest, bool | set[str]]:
    """The v2 request, and which outputs go back as binary (True: all of them)."""
    name, version = _model(request)
    inputs = []
    for t in parsed.inputs:
        tensor = v2.Tensor(t.name, t.datatype, t.shape, raw=t.raw, values=t.values)
        if t.binary is not None:
            at, size = t.binary
            tensor.raw = binary[at : at + size]
        inputs.append(tensor)
    outputs: list[v2.RequestedOutput] = []
    for output, k, times in parsed.outputs:
        outputs += [v2.RequestedOutput(output, k)] * times  # one object, repeated: v2.py refuses it
    infer = v2.InferRequest(
        model_name=name,
        model_version=version,
        inputs=inputs,
        outputs=outputs,
        id=parsed.id,
        parameters=parsed.parameters,
    )
    return infer, True if parsed.binary_output else parsed.binary_names


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
