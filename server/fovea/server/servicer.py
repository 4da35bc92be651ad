"""fovea.v1.ClassifierService over grpc.aio: protobuf messages to the core's dataclasses and back.

Nothing else happens here: rpc.RpcHandler does the request id, status mapping, logging and metrics
that every gRPC servicer shares, and the core does the work.
"""

from __future__ import annotations

import grpc
from fovea.server import core
from fovea.server.metrics import Metrics
from fovea.server.rollout import route_key
from fovea.server.rpc import RpcHandler, deadline, rpc_method
from fovea.v1 import classifier_pb2 as pb
from fovea.v1 import classifier_pb2_grpc

PROTOCOL = "fovea.v1"  # the `protocol` label of the request metrics
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ClassifierService"].full_name
_DTYPES = {pb.DATA_TYPE_UINT8: "uint8", pb.DATA_TYPE_FLOAT32: "float32"}


class ClassifierServicer(classifier_pb2_grpc.ClassifierServiceServicer):
    def __init__(self, core_: core.Core, metrics: Metrics) -> None:
        self._core = core_
        self._rpc = RpcHandler(
            metrics, PROTOCOL, ("Predict", "GetModelMetadata", "ListModels"), service=SERVICE_NAME
        )

    Predict = rpc_method("Predict", "_predict")

    GetModelMetadata = rpc_method("GetModelMetadata", "_metadata")

    ListModels = rpc_method("ListModels", "_list_models")

    async def _predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        images: list = []
        for image in request.images:
            kind = image.WhichOneof("kind")
            if kind == "encoded":
                images.append(core.EncodedImage(image.encoded))
            elif kind == "raw":
                raw = image.raw
                images.append(core.RawImage(_DTYPES.get(raw.dtype, ""), tuple(raw.shape), raw.data))
            else:
                images.append(None)
        result = await self._core.predict(
            core.PredictRequest(
                images=images,
                model_name=request.model_spec.name,
                model_version=request.model_spec.version,
                model_label=request.model_spec.version_label,
                route_key=route_key(context.invocation_metadata()),
                top_k=request.top_k,
                return_probabilities=request.return_probabilities,
                deadline=deadline(context),
                min_score=request.min_score,
                use_model_threshold=request.use_model_threshold,
            )
        )
        response = pb.PredictResponse(
            model_spec=pb.ModelSpec(name=result.model_name, version=result.model_version)
        )
        for prediction in result.predictions:
            out = response.predictions.add()
            for index, label, score in prediction.top:
                out.top.add(index=index, label=label, score=score)
            if prediction.probabilities is not None:
                out.probabilities.extend(prediction.probabilities.tolist())
            out.abstained = prediction.abstained
        return response

    async def _metadata(
        self, request: pb.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelMetadataResponse:
        spec = request.model_spec
        d = self._core.metadata(spec.name, spec.version, spec.version_label)
        m = d.metadata
        return pb.GetModelMetadataResponse(
            model_spec=pb.ModelSpec(name=m.name, version=m.version),
            labels=m.labels,
            input_height=m.input_height,
            input_width=m.input_width,
            backbone=m.backbone,
            loaded_versions=d.loaded_versions,
            metrics=m.numeric_metrics(),
            created_at=m.created_at,
            max_images_per_request=d.max_images_per_request,
            version_labels=d.labels,
        )

    async def _list_models(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelStatus(name=m.name, versions=m.versions, ready=m.ready, version_labels=m.labels)
                for m in self._core.list_models()
            ]
        )
