"""OpenTelemetry traces: a server span per RPC (a child of the caller's W3C `traceparent`), with spans
for decode, queue wait and compute, so a caller's trace shows where the time went.

Optional: the `otel` extra (`pip install 'fovea[otel]'`), and off unless configured with the standard
variables: OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) or OTEL_TRACES_EXPORTER
(`otlp` or `console`; `none` turns it off, as does OTEL_SDK_DISABLED=true). OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES and the exporter's own OTEL_EXPORTER_OTLP_* settings apply as usual.
When off, every hook here is a no-op that imports nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)

_tracer: Any = None  # an opentelemetry Tracer while tracing is on


def enabled() -> bool:
    return _tracer is not None


def configured(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """Whether the OTEL_* variables ask for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return bool(exporter or endpoint)


def setup() -> bool:
    """Turn tracing on when the OTEL_* variables ask for it; return whether it is on."""
    if not configured():
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("OTEL_* variables are set but the otel extra is not installed: no traces")
        return False
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")]
    provider = TracerProvider(resource=Resource.create({"service.name": "fovea"}))  # OTEL_SERVICE_NAME wins
    for name in names:
        if name == "console":
            exporter = ConsoleSpanExporter()
        elif name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError:
                log.warning("OTEL_TRACES_EXPORTER=otlp needs the otel extra's OTLP exporter: no traces")
                return False
            exporter = OTLPSpanExporter()
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console): no traces", name)
            return False
        provider.add_span_processor(BatchSpanProcessor(exporter))
    use(provider)
    log.info("tracing on: exporting spans to %s", ", ".join(names))
    return True


def use(provider: Any) -> None:
    """Trace with this TracerProvider (tests pass one with an in-memory exporter); None turns it off."""
    global _tracer
    _tracer = None if provider is None else provider.get_tracer("fovea.server")


class ServerSpan:
    """The span of one request, current until finish(): the core's spans become its children."""

    def __init__(self, span: Any, token: Any) -> None:
        self._span, self._token = span, token

    def finish(self, code: str) -> None:
        if self._span is None:
            return
        from opentelemetry import context, trace

        self._span.set_attribute("rpc.grpc.status_code", code)
        if code not in ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED"):
            self._span.set_status(trace.Status(trace.StatusCode.ERROR, code))
        self._span.end()
        context.detach(self._token)


_OFF = ServerSpan(None, None)


def start_server_span(
    service: str, method: str, metadata: Iterable[tuple[str, Any]] | None, system: str = "grpc"
) -> ServerSpan:
    """Start the request's span, continuing the caller's trace from `traceparent`/`tracestate` (gRPC
    metadata or HTTP headers); `system` is the transport ("grpc" or "http")."""
    if _tracer is None:
        return _OFF
    from opentelemetry import context, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {str(k).lower(): str(v) for k, v in (metadata or ()) if isinstance(v, str)}
    parent = TraceContextTextMapPropagator().extract(carrier)
    span = _tracer.start_span(
        f"{service}/{method}",
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={"rpc.system": system, "rpc.service": service, "rpc.method": method},
    )
    return ServerSpan(span, context.attach(trace.set_span_in_context(span)))


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    """A child span of the current one around a block (decode)."""
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(name, attributes=attributes):
        yield


def record_batches(timings: Iterable[Any] | None, clock_now: float | None = None) -> None:
    """`queue wait` and `compute` spans, after the fact, from the batcher's BatchTimings (monotonic)."""
    if _tracer is None or timings is None:
        return
    # The batcher's clock is time.monotonic; spans take wall-clock nanoseconds.
    offset_ns = time.time_ns() - int((time.monotonic() if clock_now is None else clock_now) * 1e9)
    for t in timings:
        if not t.finished:
            continue
        enqueued, started, finished = (offset_ns + int(x * 1e9) for x in (t.enqueued, t.started, t.finished))
        _tracer.start_span("queue wait", start_time=enqueued).end(end_time=started)
        compute = _tracer.start_span(
            "compute", start_time=started, attributes={"batch.images": t.batch_images}
        )
        compute.end(end_time=finished)
