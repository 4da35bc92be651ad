"""OpenTelemetry: a caller's W3C trace continues into the server, with decode, queue wait and compute."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the server tests need the server extra")
pytest.importorskip("opentelemetry.sdk", reason="tracing needs the otel extra (pip install '.[otel]')")

from _models import export_tiny
from _serving import channel, start_server, stop_server, wait_until
from fovea.server import tracing
from fovea.v1 import classifier_pb2 as pb
from fovea.v1 import classifier_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from PIL import Image

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def exporter():
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.use(provider)
    yield memory
    tracing.use(None)


def _png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_spans_continue_the_callers_trace(exporter, tmp_path):
    export_tiny(tmp_path, "tiny", 16)
    srv = start_server(tmp_path)
    try:
        wait_until(lambda: srv.manager.ready, what="ready")
        stub = classifier_pb2_grpc.ClassifierServiceStub(channel(srv.port))
        request = pb.PredictRequest(images=[pb.Image(encoded=_png())] * 2)
        metadata = [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")]
        stub.Predict(request, metadata=metadata, timeout=30)
    finally:
        stop_server(srv)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    server = spans["fovea.v1.ClassifierService/Predict"]
    assert server.kind == SpanKind.SERVER
    assert format(server.context.trace_id, "032x") == TRACE_ID  # the caller's trace
    assert format(server.parent.span_id, "016x") == PARENT_ID  # a child of the caller's span
    assert server.attributes["rpc.grpc.status_code"] == "OK"
    for name in ("decode", "queue wait", "compute"):
        child = spans[name]
        assert child.parent.span_id == server.context.span_id, name
        assert server.start_time <= child.start_time <= child.end_time <= server.end_time, name
    assert spans["queue wait"].end_time == spans["compute"].start_time
    assert spans["compute"].attributes["batch.images"] == 2


def test_without_a_caller_trace_a_new_one_starts(exporter, tmp_path):
    srv = start_server(tmp_path)
    try:
        stub = classifier_pb2_grpc.ClassifierServiceStub(channel(srv.port))
        stub.ListModels(pb.ListModelsRequest(), timeout=10)
    finally:
        stop_server(srv)
    (span,) = exporter.get_finished_spans()
    assert span.name == "fovea.v1.ClassifierService/ListModels" and span.parent is None


def test_off_unless_otel_variables_ask():
    assert not tracing.configured({})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert tracing.configured({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.configured({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"})
    assert not tracing.configured({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"})
    assert not tracing.enabled()


def test_rest_requests_get_the_same_spans(exporter, tmp_path):
    # One request wrapper (calls.Call) serves both ports: REST gets a server span continuing the
    # caller's traceparent header, with decode, queue wait and compute under it, and the outcome code.
    import json
    import urllib.error
    import urllib.request

    export_tiny(tmp_path, "tiny", 16)
    srv = start_server(tmp_path)
    try:
        wait_until(lambda: srv.manager.ready, what="ready")
        body = {
            "inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 16, 16, 3], "data": [0] * 768}]
        }
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "Content-Type": "application/json"}
        url = f"http://127.0.0.1:{srv.http_port}/v2/models/tiny/infer"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
        bad = urllib.request.Request(url, data=b'{"inputs": 5}', headers=headers)
        try:
            urllib.request.urlopen(bad, timeout=30)
        except urllib.error.HTTPError as exc:
            assert exc.code == 400
    finally:
        stop_server(srv)
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.name == "v2-http/ModelInfer"]
    assert [s.attributes["rpc.grpc.status_code"] for s in servers] == ["OK", "INVALID_ARGUMENT"]
    ok = servers[0]
    assert ok.kind == SpanKind.SERVER and ok.attributes["rpc.system"] == "http"
    assert format(ok.context.trace_id, "032x") == TRACE_ID
    assert format(ok.parent.span_id, "016x") == PARENT_ID
    for name in ("decode", "queue wait", "compute"):
        (child,) = [s for s in spans if s.name == name]
        assert child.parent.span_id == ok.context.span_id, name
