"""fovea.v1.ClassifierService over grpc.aio: the only module that touches protobuf messages.

Each method translates the request into the core's dataclasses, calls the core, and translates the
result back. ServingError codes become gRPC statuses; anything else is INTERNAL with a fixed
message, and the traceback goes to the log with the request id.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from fovea.server import core, logs, tracing
from fovea.server.errors import INTERNAL_MESSAGE, ServingError
from fovea.server.metrics import Metrics
from fovea.v1 import classifier_pb2 as pb
from fovea.v1 import classifier_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ClassifierService"].full_name
_DTYPES = {pb.DATA_TYPE_UINT8: "uint8", pb.DATA_TYPE_FLOAT32: "float32"}


class ClassifierServicer(classifier_pb2_grpc.ClassifierServiceServicer):
    def __init__(self, core_: core.Core, metrics: Metrics) -> None:
        self._core = core_
        self._metrics = metrics
        self._durations = {
            m: metrics.request_duration.labels(m) for m in ("Predict", "GetModelMetadata", "ListModels")
        }

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        return await self._handle("Predict", self._predict, request, context)

    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelMetadataResponse:
        return await self._handle("GetModelMetadata", self._metadata, request, context)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return await self._handle("ListModels", self._list_models, request, context)

    async def _handle(self, method: str, fn, request, context: grpc.aio.ServicerContext):
        request_id = _request_id(context)
        token = logs.request_id.set(request_id)
        span = tracing.start_server_span(SERVICE_NAME, method, context.invocation_metadata())
        start = time.perf_counter()
        code = "OK"
        trailer = ((logs.REQUEST_ID_HEADER, request_id),)
        try:
            response = await fn(request, context)
            context.set_trailing_metadata(trailer)
            return response
        except ServingError as exc:
            code = exc.code
            level = logging.WARNING if code in ("INTERNAL", "RESOURCE_EXHAUSTED") else logging.INFO
            log.log(level, "%s: %s: %s", method, code, exc.message)
            await context.abort(grpc.StatusCode[code], exc.message, trailer)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            # gRPC's deadline timer may fire a hair before time_remaining() reaches zero.
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining < 0.05 else "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = "INTERNAL"
            log.exception("%s failed", method)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"{INTERNAL_MESSAGE} (request id {request_id})", trailer
            )
        finally:
            self._metrics.requests.labels(method, code).inc()
            self._durations[method].observe(time.perf_counter() - start)
            span.finish(code)
            logs.request_id.reset(token)

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
        remaining = context.time_remaining()
        result = await self._core.predict(
            core.PredictRequest(
                images=images,
                model_name=request.model_spec.name,
                model_version=request.model_spec.version,
                top_k=request.top_k,
                return_probabilities=request.return_probabilities,
                deadline=None if remaining is None else time.monotonic() + remaining,
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
        return response

    async def _metadata(
        self, request: pb.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelMetadataResponse:
        m = self._core.metadata(request.model_spec.name, request.model_spec.version)
        return pb.GetModelMetadataResponse(
            model_spec=pb.ModelSpec(name=m.name, version=m.version),
            labels=m.labels,
            input_height=m.input_height,
            input_width=m.input_width,
            backbone=m.backbone,
            loaded_versions=m.loaded_versions,
            metrics=m.metrics,
            created_at=m.created_at,
            max_images_per_request=m.max_images_per_request,
        )

    async def _list_models(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelStatus(name=m.name, versions=m.versions, ready=m.ready)
                for m in self._core.list_models()
            ]
        )


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == logs.REQUEST_ID_HEADER and value:
            return str(value)[:128]
    return logs.new_request_id()
