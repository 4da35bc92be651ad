"""TF Serving's API (tensorflow.serving.PredictionService and ModelService) over grpc.aio.

A thin translation between the real tensorflow-serving-api messages and the core. The served
signatures are the export contract's: `serving_default` takes uint8 `images [N, H, W, 3]` and
`serving_bytes` takes encoded `image_bytes [N]`; both return float32 `probabilities [N, classes]`.
As a convenience, Predict accepts either input under either signature, named `images` or
`image_bytes`, its dtype saying which it is: many TF Serving clients send encoded bytes to
`serving_default`.

The messages import TensorFlow's framework protos (tensorflow.core.framework), the same modules
TensorFlow itself registers, so there is nothing to clash; this module uses them only through the
tensorflow_serving messages and runs no TensorFlow code.
"""

from __future__ import annotations

import numpy as np
from fovea import contract
from fovea.contract import INPUT_BYTES, INPUT_IMAGES, OUTPUT, SIGNATURE_BYTES, SIGNATURE_IMAGES, ModelMetadata
from fovea.server import core
from fovea.server.errors import InvalidArgument, clip
from fovea.server.metrics import Metrics
from fovea.server.rollout import route_key
from fovea.server.rpc import RpcHandler, deadline, rpc_method
from google.protobuf import any_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
PROTOCOL = "tf-serving"  # the `protocol` label of the request metrics
PREDICT_METHOD = "tensorflow/serving/predict"
# TensorFlow's DataType enum, read from the messages' descriptors: tensorflow-serving-api's modules
# import TensorFlow's framework protos, but fovea's rule is that only loader.py imports tensorflow.
_TENSOR = predict_pb2.PredictRequest.DESCRIPTOR.fields_by_name["inputs"].message_type.fields_by_name["value"]
_DATA_TYPE = _TENSOR.message_type.fields_by_name["dtype"].enum_type
DT_FLOAT = _DATA_TYPE.values_by_name["DT_FLOAT"].number
DT_UINT8 = _DATA_TYPE.values_by_name["DT_UINT8"].number
DT_STRING = _DATA_TYPE.values_by_name["DT_STRING"].number
DT_DOUBLE = _DATA_TYPE.values_by_name["DT_DOUBLE"].number
DT_BOOL = _DATA_TYPE.values_by_name["DT_BOOL"].number
# Answering only when sure (abstention.py). TF Serving's PredictRequest has no parameters, so the
# threshold travels as extra scalar inputs beside the image input, and the answer as an extra output
# (only when a threshold was asked, so plain TF Serving clients see exactly the usual response).
MIN_SCORE = "min_score"  # DT_FLOAT or DT_DOUBLE, one value
USE_MODEL_THRESHOLD = "use_model_threshold"  # DT_BOOL, one value
ABSTAINED = "abstained"  # DT_BOOL [N]


def _cut(text: str, limit: int = 64) -> str:
    return clip(text, limit, quote=False)  # errors.clip: the one rule for echoed values


def _version(spec: model_pb2.ModelSpec) -> tuple[int, str]:
    """ModelSpec.version or version_label -> the core's (version, label); (0, "") for the default."""
    if spec.HasField("version"):
        if spec.version.value < 1:
            raise InvalidArgument(
                f"model_spec.version is {spec.version.value}; versions are positive integers"
            )
        return spec.version.value, ""
    label = spec.version_label
    if label in ("", "latest"):
        return 0, ""
    version = contract.version_of(label)
    if version is not None:
        return version, ""  # a numeric label names that version
    return 0, label  # a rollout.json label, resolved (or refused) by the core


def _echo(name: str, version: int, signature: str = "") -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=name, signature_name=signature)
    spec.version.value = version
    return spec


def _shape(tensor) -> list[int]:
    return [d.size for d in tensor.tensor_shape.dim]


def _describe(key: str, tensor) -> str:
    value = _DATA_TYPE.values_by_number.get(tensor.dtype)
    dtype = value.name if value is not None else str(tensor.dtype)
    return f"{_cut(key)!r} {dtype} {_shape(tensor)}"


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core_: core.Core, metrics: Metrics) -> None:
        self._core = core_
        self._rpc = RpcHandler(
            metrics, PROTOCOL, ("Predict", "Classify", "GetModelMetadata"), service=PREDICTION_SERVICE
        )

    Predict = rpc_method("Predict", "_predict")

    Classify = rpc_method("Classify", "_classify")

    GetModelMetadata = rpc_method("GetModelMetadata", "_metadata")

    async def _predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        signature = spec.signature_name or SIGNATURE_IMAGES
        if signature not in (SIGNATURE_IMAGES, SIGNATURE_BYTES):
            raise InvalidArgument(
                f"signature_name {_cut(signature)!r} is not served; use {SIGNATURE_IMAGES!r} (uint8 images) or "
                f"{SIGNATURE_BYTES!r} (encoded image bytes)"
            )
        unknown = [o for o in request.output_filter if o not in (OUTPUT, ABSTAINED)]
        if unknown:
            raise InvalidArgument(
                f"output_filter names {_cut(unknown[0])!r}; the outputs are {OUTPUT!r} and, with a "
                f"{MIN_SCORE!r} or {USE_MODEL_THRESHOLD!r} input, {ABSTAINED!r}"
            )
        inputs, min_score, use_model_threshold = _threshold_inputs(request.inputs)
        meta = self._core.served_metadata(
            spec.name, *_version(spec), route_key(context.invocation_metadata())
        )
        result = await self._core.predict(
            core.PredictRequest(
                images=_predict_images(inputs, meta),
                model_name=meta.name,
                model_version=meta.version,
                return_probabilities=True,
                deadline=deadline(context),
                min_score=min_score,
                use_model_threshold=use_model_threshold,
            )
        )
        probs = np.stack([p.probabilities for p in result.predictions]).astype(np.float32)
        response = predict_pb2.PredictResponse(
            model_spec=_echo(result.model_name, result.model_version, signature)
        )
        wanted = set(request.output_filter) or {OUTPUT, ABSTAINED}
        if OUTPUT in wanted:
            out = response.outputs[OUTPUT]
            out.dtype = DT_FLOAT
            _set_shape(out.tensor_shape, probs.shape)
            out.float_val.extend(probs.reshape(-1).tolist())
        if ABSTAINED in wanted and (min_score > 0 or use_model_threshold):
            flags = response.outputs[ABSTAINED]
            flags.dtype = DT_BOOL
            _set_shape(flags.tensor_shape, (len(result.predictions),))
            flags.bool_val.extend(p.abstained for p in result.predictions)
        return response

    async def _classify(
        self, request: classification_pb2.ClassificationRequest, context
    ) -> classification_pb2.ClassificationResponse:
        spec = request.model_spec
        meta = self._core.served_metadata(
            spec.name, *_version(spec), route_key(context.invocation_metadata())
        )
        result = await self._core.predict(
            core.PredictRequest(
                images=[core.EncodedImage(b) for b in _example_images(request.input)],
                model_name=meta.name,
                model_version=meta.version,
                deadline=deadline(context),
            )
        )
        response = classification_pb2.ClassificationResponse(
            model_spec=_echo(result.model_name, result.model_version, spec.signature_name)
        )
        for prediction in result.predictions:
            classes = response.result.classifications.add()
            for _, label, score in prediction.top:
                classes.classes.add(label=label, score=score)
        return response

    async def _metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            raise InvalidArgument(
                f"metadata_field is {[_cut(f) for f in fields]}; fovea answers ['signature_def']"
            )
        spec = request.model_spec
        meta = self._core.metadata(spec.name, *_version(spec)).metadata
        packed = any_pb2.Any()
        packed.Pack(_signature_defs(meta))
        response = get_model_metadata_pb2.GetModelMetadataResponse(
            model_spec=_echo(meta.name, meta.version, spec.signature_name)
        )
        response.metadata["signature_def"].CopyFrom(packed)
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core_: core.Core, metrics: Metrics) -> None:
        self._core = core_
        self._rpc = RpcHandler(metrics, PROTOCOL, ("GetModelStatus",), service=MODEL_SERVICE)

    GetModelStatus = rpc_method("GetModelStatus", "_status")

    async def _status(
        self, request: get_model_status_pb2.GetModelStatusRequest, context
    ) -> get_model_status_pb2.GetModelStatusResponse:
        spec = request.model_spec
        version, label = _version(spec)
        described = self._core.metadata(spec.name, version, label)
        if label:
            version = described.metadata.version
        versions = [version] if version else described.loaded_versions
        available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return get_model_status_pb2.GetModelStatusResponse(
            model_version_status=[
                get_model_status_pb2.ModelVersionStatus(version=v, state=available) for v in versions
            ]
        )


def _set_shape(proto, shape) -> None:
    """Fill a TensorShapeProto in place."""
    for size in shape:
        proto.dim.add(size=size)


def _scalar(key: str, tensor, dtypes: dict[int, tuple[str, type]]) -> object:
    """The one value of a scalar input (in its typed list or tensor_content); InvalidArgument otherwise."""
    if tensor.dtype in dtypes:
        field, np_type = dtypes[tensor.dtype]
        values = (
            np.frombuffer(tensor.tensor_content, np_type).tolist()
            if tensor.tensor_content
            else list(getattr(tensor, field))
        )
        if len(values) == 1 and int(np.prod(_shape(tensor) or [1])) == 1:
            return values[0]
    names = " or ".join(_DATA_TYPE.values_by_number[d].name for d in dtypes)
    raise InvalidArgument(f"input {_describe(key, tensor)}: expected one {names} value")


def _threshold_inputs(inputs) -> tuple[dict, float, bool]:
    """(the image inputs, min_score, use_model_threshold): the threshold inputs taken out."""
    images = {k: t for k, t in inputs.items() if k not in (MIN_SCORE, USE_MODEL_THRESHOLD)}
    min_score, use_model_threshold = 0.0, False
    if MIN_SCORE in inputs:
        floats = {DT_FLOAT: ("float_val", np.float32), DT_DOUBLE: ("double_val", np.float64)}
        min_score = float(_scalar(MIN_SCORE, inputs[MIN_SCORE], floats))  # type: ignore[arg-type]
    if USE_MODEL_THRESHOLD in inputs:
        use_model_threshold = bool(
            _scalar(USE_MODEL_THRESHOLD, inputs[USE_MODEL_THRESHOLD], {DT_BOOL: ("bool_val", np.bool_)})
        )
    return images, min_score, use_model_threshold


def _predict_images(inputs, meta: ModelMetadata) -> list:
    h, w = meta.input_height, meta.input_width
    expected = f"{INPUT_IMAGES!r} DT_UINT8 [-1, {h}, {w}, 3] or {INPUT_BYTES!r} DT_STRING [-1]"
    received = ", ".join(_describe(k, t) for k, t in sorted(inputs.items())) or "none"
    if len(inputs) != 1:
        raise InvalidArgument(f"model {meta.name!r} expects one input, {expected}; received {received}")
    ((key, tensor),) = inputs.items()
    shape = _shape(tensor)
    if key not in (INPUT_IMAGES, INPUT_BYTES):
        raise InvalidArgument(f"model {meta.name!r} expects one input, {expected}; received {received}")
    if tensor.dtype == DT_STRING:
        if (
            len(shape) not in (1, 2)
            or (len(shape) == 2 and shape[1] != 1)
            or len(tensor.string_val) != shape[0]
        ):
            raise InvalidArgument(
                f"input {_describe(key, tensor)} with {len(tensor.string_val)} string_val; expected "
                "DT_STRING [-1] with one string_val (an encoded image) per image"
            )
        return [core.EncodedImage(b) for b in tensor.string_val]
    if tensor.dtype == DT_UINT8:
        if len(shape) != 4 or shape[0] < 1 or shape[1:] != [h, w, 3]:
            raise InvalidArgument(
                f"model {meta.name!r} expects DT_UINT8 [-1, {h}, {w}, 3]; received "
                f"{_describe(key, tensor)} (send images resized to {h}x{w} RGB, or encoded bytes as {INPUT_BYTES!r})"
            )
        size = h * w * 3
        # The length first: an int_val list of the wrong size is refused before it is converted.
        content = tensor.tensor_content  # read once: each read of a bytes field is a copy
        count = len(content) if content else len(tensor.int_val)
        if count != shape[0] * size:
            raise InvalidArgument(
                f"input {_describe(key, tensor)} carries {count} bytes; its shape needs {shape[0] * size}"
            )
        if content:
            data = memoryview(content)
        else:
            # int_val carries each uint8 in an int32; TF Serving keeps the low byte.
            data = memoryview((np.asarray(tensor.int_val, dtype=np.int64) & 0xFF).astype(np.uint8).tobytes())
        return [core.RawImage("uint8", (h, w, 3), data[i * size : (i + 1) * size]) for i in range(shape[0])]
    raise InvalidArgument(f"model {meta.name!r} expects one input, {expected}; received {received}")


def _example_images(data) -> list[bytes]:
    """The encoded image of each tf.Example: the `image_bytes` feature, else the only bytes feature."""
    kind = data.WhichOneof("kind")
    if kind == "example_list":
        examples, context = list(data.example_list.examples), None
    elif kind == "example_list_with_context":
        examples, context = (
            list(data.example_list_with_context.examples),
            data.example_list_with_context.context,
        )
    else:
        raise InvalidArgument("input has no examples; send input.example_list with one tf.Example per image")
    images = []
    for i, example in enumerate(examples):
        features = dict(example.features.feature)
        if context is not None:
            features = {**dict(context.features.feature), **features}
        candidates = [
            k for k, f in features.items() if f.WhichOneof("kind") == "bytes_list" and f.bytes_list.value
        ]
        key = INPUT_BYTES if INPUT_BYTES in candidates else (candidates[0] if len(candidates) == 1 else None)
        if key is None:
            raise InvalidArgument(
                f"examples[{i}] has bytes features {sorted(_cut(c) for c in candidates)}; put the encoded image in "
                f"a bytes feature named {INPUT_BYTES!r}"
            )
        values = features[key].bytes_list.value
        if len(values) != 1:
            raise InvalidArgument(
                f"examples[{i}].{_cut(key)} holds {len(values)} values; send one image per example"
            )
        images.append(values[0])
    return images


def _signature_defs(meta: ModelMetadata) -> get_model_metadata_pb2.SignatureDefMap:
    defs = get_model_metadata_pb2.SignatureDefMap()
    h, w, classes = meta.input_height, meta.input_width, len(meta.labels)
    for signature, key, dtype, shape in (
        (SIGNATURE_IMAGES, INPUT_IMAGES, DT_UINT8, (-1, h, w, 3)),
        (SIGNATURE_BYTES, INPUT_BYTES, DT_STRING, (-1,)),
    ):
        sig = defs.signature_def[signature]
        sig.method_name = PREDICT_METHOD
        inp = sig.inputs[key]
        inp.name, inp.dtype = f"{signature}_{key}:0", dtype
        _set_shape(inp.tensor_shape, shape)
        out = sig.outputs[OUTPUT]
        out.name, out.dtype = "StatefulPartitionedCall:0", DT_FLOAT
        _set_shape(out.tensor_shape, (-1, classes))
    return defs
