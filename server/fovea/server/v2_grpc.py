"""inference.GRPCInferenceService (KServe v2 / Open Inference Protocol, Triton's superset) over grpc.aio.

A thin translation between the vendored messages (fovea.inference, in a private descriptor pool) and
the transport-free v2 operations in v2.py. ModelStreamInfer and Triton's repository, shared-memory,
trace and log RPCs answer UNIMPLEMENTED.
"""

from __future__ import annotations

from typing import Any

import grpc
from fovea.inference import grpc_service_pb2 as pb
from fovea.inference import grpc_service_pb2_grpc, model_config_pb2
from fovea.server import v2
from fovea.server.errors import InvalidArgument
from fovea.server.metrics import Metrics
from fovea.server.rollout import route_key
from fovea.server.rpc import RpcHandler, deadline, rpc_method
from google.protobuf import json_format

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PROTOCOL = "v2-grpc"  # the `protocol` label of the request metrics
# Typed contents a request may carry instead of raw_input_contents, by datatype.
_CONTENTS = {"UINT8": "uint_contents", "BYTES": "bytes_contents"}


_METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "ModelInfer",
)


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, ops: v2.V2, metrics: Metrics) -> None:
        self._v2 = ops
        self._rpc = RpcHandler(metrics, PROTOCOL, _METHODS, service=SERVICE_NAME)

    ServerLive = rpc_method("ServerLive", "_live")

    ServerReady = rpc_method("ServerReady", "_ready")

    ModelReady = rpc_method("ModelReady", "_model_ready")

    ServerMetadata = rpc_method("ServerMetadata", "_server_metadata")

    ModelMetadata = rpc_method("ModelMetadata", "_metadata")

    ModelConfig = rpc_method("ModelConfig", "_config")

    ModelStatistics = rpc_method("ModelStatistics", "_statistics")

    RepositoryIndex = rpc_method("RepositoryIndex", "_index")

    ModelInfer = rpc_method("ModelInfer", "_infer")

    async def ModelStreamInfer(self, request_iterator, context) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "ModelStreamInfer is not supported by fovea; call ModelInfer"
        )

    async def _live(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def _ready(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._v2.server_ready())

    async def _model_ready(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._v2.model_ready(request.name, request.version))

    async def _server_metadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self._v2.server_metadata())

    async def _metadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        m = self._v2.model_metadata(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=m.name,
            versions=m.versions,
            platform=m.platform,
            inputs=[_tensor_metadata(t) for t in m.inputs],
            outputs=[_tensor_metadata(t) for t in m.outputs],
            properties=m.properties,
        )

    async def _config(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        config = self._v2.model_config(request.name, request.version)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    async def _statistics(self, request: pb.ModelStatisticsRequest, context) -> pb.ModelStatisticsResponse:
        stats = self._v2.statistics(request.name, request.version)
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    async def _index(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        rows = self._v2.repository_index(request.ready)
        index = pb.RepositoryIndexResponse.ModelIndex
        fields = ("name", "version", "state", "reason")  # the message has no field for version labels
        return pb.RepositoryIndexResponse(models=[index(**{k: r[k] for k in fields}) for r in rows])

    async def _infer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        infer_request = _infer_request(request)
        infer_request.route_key = route_key(context.invocation_metadata())
        result = await self._v2.infer(infer_request, deadline(context))
        response = pb.ModelInferResponse(
            model_name=result.model_name, model_version=result.model_version, id=result.id
        )
        for out in result.outputs:
            added = response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
            for key, value in out.parameters.items():
                added.parameters[key].string_param = value
            # raw_output_contents is what tritonclient's as_numpy reads.
            response.raw_output_contents.append(out.raw())
        return response


def _tensor_metadata(spec: v2.TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def _parameter(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _infer_request(request: pb.ModelInferRequest) -> v2.InferRequest:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; send one per input"
        )
    inputs = []
    for i, t in enumerate(request.inputs):
        tensor = v2.Tensor(t.name, t.datatype, tuple(t.shape))
        if raw:
            tensor.raw = raw[i]
        else:
            tensor.values = list(getattr(t.contents, _CONTENTS.get(t.datatype, "bytes_contents")))
        inputs.append(tensor)
    outputs = []
    for o in request.outputs:
        k = _parameter(o.parameters["classification"]) if "classification" in o.parameters else 0
        if isinstance(k, bool) or not isinstance(k, int):
            raise InvalidArgument(f"output {o.name!r}: the classification parameter must be an integer")
        outputs.append(v2.RequestedOutput(o.name, k))
    return v2.InferRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        inputs=inputs,
        outputs=outputs,
        id=request.id,
        parameters={k: _parameter(v) for k, v in request.parameters.items()},
    )
