"""The KServe v2 / Open Inference Protocol without a transport: names, tensors, validation, metadata.

gRPC (v2_grpc.py) and REST (v2_http.py) translate their messages to and from these plain types, so
the protocol's rules live here once. Nothing here imports grpc, protobuf or aiohttp.

Each fovea model appears under two v2 names, because perf_analyzer fills every input a model
declares and random BYTES are not images:
- `MODEL` takes UINT8 `images [-1, H, W, 3]` at the trained size;
- `MODEL-encoded` takes BYTES `image_bytes [-1, 1]` (JPEG, PNG, GIF or BMP of any size).
Both answer FP32 `probabilities [-1, classes]` from the same model version's batcher.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata as _pkg_metadata
from typing import Any

import numpy as np
from fovea import contract
from fovea.contract import INPUT_BYTES, INPUT_IMAGES, OUTPUT, ModelMetadata
from fovea.server import core
from fovea.server.errors import InvalidArgument, NotFound, ServingError, clip

ENCODED_SUFFIX = "-encoded"
PLATFORM = "tensorflow_savedmodel"
# What ServerMetadata advertises. "statistics" makes perf_analyzer call ModelStatistics each window;
# "classification" is fovea's top-k; "parameters" because request parameters are read (unknown ones
# are ignored); "binary_tensor_data" is the REST binary extension tritonclient.http uses.
EXTENSIONS = ("classification", "model_configuration", "statistics", "binary_tensor_data", "parameters")
_ECHO = 64  # echoed names are cut to this many characters


def server_version() -> str:
    try:
        return _pkg_metadata.version("fovea")
    except _pkg_metadata.PackageNotFoundError:
        return "0"


def _cut(text: str) -> str:
    return clip(text, _ECHO, quote=False)  # errors.clip: the one rule for echoed values


@dataclass
class TensorSpec:
    """A tensor's name, datatype and shape: a model's input or output, and the base of a request's
    inputs and a response's outputs."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def text(self) -> str:
        # Cut: a request's names and datatypes are echoed in errors (the model's own are short).
        return f"'{_cut(self.name)}' {_cut(self.datatype)} {list(self.shape)}"


@dataclass
class Tensor(TensorSpec):
    """A request input: raw little-endian bytes (BYTES elements length-prefixed) or typed values."""

    raw: bytes | memoryview | None = None
    values: Sequence[Any] | None = None


@dataclass
class Output(TensorSpec):
    """A response output: FP32 probabilities [N, classes] or BYTES classification [N, k]."""

    array: np.ndarray  # float32, or an object array of bytes
    # {"abstained": "true,false,..."}, one flag per row, when the request asked for a score threshold
    parameters: dict[str, Any] = field(default_factory=dict)

    def raw(self) -> bytes:
        if self.datatype == "BYTES":
            return pack_bytes(self.array.reshape(-1).tolist())
        return self.array.astype("<f4", copy=False).tobytes()

    def values(self) -> list:
        """Flattened, row-major, as the JSON form wants (BYTES as text)."""
        if self.datatype == "BYTES":
            return [b.decode() for b in self.array.reshape(-1).tolist()]
        return self.array.reshape(-1).tolist()


@dataclass
class RequestedOutput:
    name: str
    classification: int = 0


@dataclass
class InferRequest:
    model_name: str
    model_version: str
    inputs: list[Tensor]
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    route_key: str = ""  # x-fovea-route-key: sticky routing by the rollout's traffic shares


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[Output]


@dataclass
class V2ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    properties: dict[str, str]


def pack_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements as the raw form wants them: each a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def unpack_bytes(raw: bytes | memoryview, what: str, most: int | None = None) -> list[bytes]:
    """The elements of BYTES raw contents; with `most`, it stops after most + 1 (a caller that
    expects `most` refuses more anyway, and zero-length elements would otherwise make a 64 MiB
    buffer a loop of 16 million turns)."""
    view = memoryview(raw)
    out, at = [], 0
    while at < len(view) and (most is None or len(out) <= most):
        if at + 4 > len(view):
            raise InvalidArgument(
                f"{what}: BYTES raw contents end inside a 4-byte length prefix at offset {at}; each element "
                "is a little-endian uint32 length followed by that many bytes"
            )
        (size,) = struct.unpack_from("<I", view, at)
        at += 4
        if at + size > len(view):
            raise InvalidArgument(
                f"{what}: a BYTES element says {size} bytes at offset {at - 4} but only {len(view) - at} remain"
            )
        out.append(bytes(view[at : at + size]))
        at += size
    return out


def parse_version(version: str) -> tuple[int, str]:
    """The core's (version, label): '' the default (0), a positive integer that version, else a label
    of the model's rollout.json (an unknown one is NOT_FOUND there)."""
    if version == "":
        return 0, ""
    number = contract.version_of(version)
    if number is not None:
        return number, ""
    if version.isdigit() or version.startswith("-"):
        raise InvalidArgument(
            f"model version {_cut(version)!r} is not a positive integer; leave it empty for the newest"
        )
    return 0, version


class V2:
    """The v2 protocol's operations over the core; both transports call only these."""

    def __init__(self, core_: core.Core) -> None:
        self._core = core_

    # -- names -----------------------------------------------------------------------------------

    def resolve(self, name: str) -> tuple[str, bool]:
        """A v2 model name -> (fovea model name, whether it is the encoded-bytes variant)."""
        if not name:
            raise InvalidArgument("the model name is empty; name one of this server's models")
        if self._core.knows(name):
            return name, False
        if name.endswith(ENCODED_SUFFIX) and self._core.knows(name[: -len(ENCODED_SUFFIX)]):
            return name[: -len(ENCODED_SUFFIX)], True
        served = {m.name for m in self._core.list_models()}  # for the message only: it builds every status
        names = ", ".join(n for m in sorted(served) for n in (m, m + ENCODED_SUFFIX)) or "(none)"
        raise NotFound(f"model {_cut(name)!r} is not served; served models: {names}")

    def specs(self, meta: ModelMetadata, encoded: bool) -> tuple[TensorSpec, TensorSpec]:
        if encoded:
            inp = TensorSpec(INPUT_BYTES, "BYTES", (-1, 1))
        else:
            inp = TensorSpec(INPUT_IMAGES, "UINT8", (-1, meta.input_height, meta.input_width, 3))
        return inp, TensorSpec(OUTPUT, "FP32", (-1, len(meta.labels)))

    def _describe(
        self, name: str, version: str, route_key: str | None = None
    ) -> tuple[str, bool, core.ModelDescription]:
        base, encoded = self.resolve(name)
        return base, encoded, self._core.metadata(base, *parse_version(version), route_key)

    # -- health and metadata ---------------------------------------------------------------------

    def server_ready(self) -> bool:
        return self._core.ready

    def model_ready(self, name: str, version: str) -> bool:
        try:
            base, _ = self.resolve(name)
            return self._core.model_ready(base, *parse_version(version))
        except ServingError:
            return False

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "fovea", "version": server_version(), "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str) -> V2ModelMetadata:
        _, encoded, d = self._describe(name, version)
        meta = d.metadata
        inp, out = self.specs(meta, encoded)
        properties = {
            "fovea_model": meta.name,
            "served_version": str(meta.version),
            "backbone": meta.backbone,
            "labels": ",".join(meta.labels),
            "created_at": meta.created_at,
            "max_images_per_request": str(d.max_images_per_request),
        }
        return V2ModelMetadata(
            name=name,
            versions=[str(v) for v in d.loaded_versions],
            platform=PLATFORM,
            inputs=[inp],
            outputs=[out],
            properties=properties,
        )

    def model_config(self, name: str, version: str) -> dict[str, Any]:
        """Triton's ModelConfig in its JSON form (REST answers it; gRPC parses it into the message).

        perf_analyzer needs at least max_batch_size and inputs that match the metadata.
        """
        _, encoded, d = self._describe(name, version)
        inp, out = self.specs(d.metadata, encoded)
        config_input: dict[str, Any] = {
            "name": inp.name,
            "data_type": "TYPE_STRING" if encoded else "TYPE_UINT8",
            "dims": list(inp.shape[1:]),
        }
        if not encoded:
            config_input["format"] = "FORMAT_NHWC"
        return {
            "name": name,
            "platform": PLATFORM,
            "backend": "tensorflow",
            "version_policy": {"specific": {"versions": list(d.loaded_versions)}},
            "max_batch_size": d.max_images_per_request,
            "input": [config_input],
            "output": [{"name": out.name, "data_type": "TYPE_FP32", "dims": list(out.shape[1:])}],
            "dynamic_batching": {},
        }

    def repository_index(self, ready_only: bool) -> list[dict[str, str]]:
        rows = []
        for m in self._core.list_models():
            if ready_only and not m.ready:
                continue
            version = str(max(m.versions)) if m.versions else ""
            state = "READY" if m.ready else "UNAVAILABLE"
            reason = "" if m.ready else "no version loaded yet"
            for name in (m.name, m.name + ENCODED_SUFFIX):
                row = {"name": name, "version": version, "state": state, "reason": reason}
                if m.labels:  # fovea's addition: the rollout's version labels
                    row["version_labels"] = {k: str(v) for k, v in sorted(m.labels.items())}
                rows.append(row)
        return rows

    def statistics(self, name: str, version: str) -> list[dict[str, Any]]:
        """Triton's ModelStatistics in JSON form: one entry per loaded version (every protocol counts).

        perf_analyzer reads these each window: `version` must be numeric and the queue count must grow.
        Both v2 names of a model report its versions' totals, as they share its batchers.
        """
        if not name:
            aliases = {m.name: [m.name, m.name + ENCODED_SUFFIX] for m in self._core.list_models()}
            return [_stats(a, s) for s in self._core.statistics() for a in aliases.get(s.name, ())]
        base, _, d = self._describe(name, version)  # NOT_FOUND for what is not served
        number = d.metadata.version if version else 0  # a label resolved to its version
        return [_stats(name, s) for s in self._core.statistics(base, number)]

    # -- inference -------------------------------------------------------------------------------

    async def infer(self, request: InferRequest, deadline: float | None) -> InferResponse:
        base, encoded = self.resolve(request.model_name)
        meta = self._core.served_metadata(base, *parse_version(request.model_version), request.route_key)
        inp, out = self.specs(meta, encoded)
        images = self._images(request, inp, meta)
        classes = len(meta.labels)
        wanted = request.outputs or [RequestedOutput(OUTPUT)]
        if len(wanted) > 1:
            # Each requested output is a copy of the result in the answer: 100,000 of the same one made
            # a 267 MB response from a 4.9 MB request. The model has one output; name it once.
            raise InvalidArgument(
                f"{len(wanted)} outputs requested; model '{_cut(request.model_name)}' has one, {out.text()}: "
                "request it once (with the classification parameter for top-k)"
            )
        for o in wanted:
            if o.name != OUTPUT:
                raise InvalidArgument(
                    f"requested output '{_cut(o.name)}' is not an output of model '{_cut(request.model_name)}';"
                    f" it has {out.text()}"
                )
            if o.classification < 0:
                raise InvalidArgument(f"classification is {o.classification}; ask for 1 or more classes")
        # Triton's classification extension returns at most the model's classes.
        top_k = max((min(o.classification, classes) for o in wanted), default=0)
        timeout_us = _int_parameter(request.parameters, "timeout")
        if timeout_us and timeout_us > 0:
            limit = time.monotonic() + min(timeout_us, 10**15) / 1e6  # a huge integer overflows a float
            deadline = limit if deadline is None else min(deadline, limit)
        result = await self._core.predict(
            core.PredictRequest(
                images=images,
                model_name=base,
                model_version=meta.version,
                top_k=top_k,
                return_probabilities=True,
                deadline=deadline,
                min_score=_float_parameter(request.parameters, "min_score"),
                use_model_threshold=request.parameters.get("use_model_threshold") is True,
            )
        )
        asked = "min_score" in request.parameters or request.parameters.get("use_model_threshold") is True
        flags = {"abstained": ",".join("true" if p.abstained else "false" for p in result.predictions)}
        outputs = []
        for o in wanted:
            if o.classification:
                k = min(o.classification, classes)
                rows = [
                    [f"{s:.9g}:{i}:{label}".encode() for i, label, s in p.top[:k]] for p in result.predictions
                ]
                outputs.append(
                    Output(
                        o.name,
                        "BYTES",
                        (len(rows), k),
                        np.array(rows, dtype=object),
                        dict(flags) if asked else {},
                    )
                )
            else:
                probs = np.stack([p.probabilities for p in result.predictions]).astype(np.float32)
                outputs.append(Output(o.name, "FP32", probs.shape, probs, dict(flags) if asked else {}))
        return InferResponse(request.model_name, str(result.model_version), request.id, outputs)

    def _images(self, request: InferRequest, spec: TensorSpec, meta: ModelMetadata) -> list:
        model = _cut(request.model_name)
        received = ", ".join(t.text() for t in request.inputs[:3]) or "none"
        if len(request.inputs) > 3:
            received += f" and {len(request.inputs) - 3} more"
        if spec.datatype == "BYTES":
            hint = f" (for UINT8 pixels use model '{model[: -len(ENCODED_SUFFIX)]}')"
        else:
            hint = f" (for encoded image bytes use model '{model}{ENCODED_SUFFIX}')"
        if len(request.inputs) != 1 or request.inputs[0].name != spec.name:
            raise InvalidArgument(
                f"model '{model}' expects one input {spec.text()}; received {received}{hint}"
            )
        tensor = request.inputs[0]
        if tensor.datatype != spec.datatype:
            raise InvalidArgument(
                f"model '{model}' expects input {spec.text()}; received {tensor.text()}{hint}"
            )
        shape = tuple(tensor.shape)
        if spec.datatype == "BYTES":
            return self._encoded(tensor, spec, model, shape)
        return self._raw(tensor, spec, model, shape, meta.input_height, meta.input_width)

    def _encoded(self, tensor: Tensor, spec: TensorSpec, model: str, shape: tuple[int, ...]) -> list:
        if len(shape) not in (1, 2) or shape[0] < 1 or (len(shape) == 2 and shape[1] != 1):
            raise InvalidArgument(
                f"model '{model}' expects input {spec.text()} (one encoded image per row); "
                f"received {tensor.text()}"
            )
        if tensor.raw is not None:
            elements = unpack_bytes(tensor.raw, f"input '{spec.name}'", most=shape[0])
        else:
            values = tensor.values or ()
            if len(values) != shape[0]:
                raise InvalidArgument(
                    f"input {tensor.text()} holds {len(values)} elements; its shape says {shape[0]}"
                )
            elements = [_element(v, tensor) for v in values]
        if len(elements) != shape[0]:
            held = f"more than {shape[0]}" if len(elements) > shape[0] else str(len(elements))
            raise InvalidArgument(f"input {tensor.text()} holds {held} elements; its shape says {shape[0]}")
        return [core.EncodedImage(e) for e in elements]

    def _raw(
        self, tensor: Tensor, spec: TensorSpec, model: str, shape: tuple[int, ...], h: int, w: int
    ) -> list:
        if len(shape) != 4 or shape[0] < 1 or shape[1:] != (h, w, 3):
            raise InvalidArgument(
                f"model '{model}' expects input {spec.text()}; received {tensor.text()} "
                f"(send images resized to {h}x{w} RGB, or encoded bytes to '{model}{ENCODED_SUFFIX}')"
            )
        size = h * w * 3
        values = tensor.values if tensor.values is not None else ()
        # The length first: a list of the wrong size is refused before it is converted.
        count = len(tensor.raw) if tensor.raw is not None else len(values)
        if count != shape[0] * size:
            raise InvalidArgument(
                f"input {tensor.text()} has {count} bytes of data; its shape needs {shape[0] * size}"
            )
        if tensor.raw is not None:
            data = memoryview(tensor.raw)
        else:
            try:
                array = np.asarray(values, dtype=np.int64)
            except (TypeError, ValueError, OverflowError):
                raise InvalidArgument(
                    f"input {tensor.text()} has values that are not integers 0..255"
                ) from None
            if array.size and (array.min() < 0 or array.max() > 255):
                raise InvalidArgument(f"input {tensor.text()} has values outside 0..255")
            data = memoryview(array.astype(np.uint8).tobytes())
        return [core.RawImage("uint8", (h, w, 3), data[i * size : (i + 1) * size]) for i in range(shape[0])]


def _element(value: Any, tensor: Tensor) -> bytes:
    """One BYTES element as bytes; never `bytes(n)` of a number a client wrote (that allocates n bytes)."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise InvalidArgument(
        f"input {tensor.text()} holds a {type(value).__name__}; BYTES elements are strings or bytes"
    )


def _int_parameter(parameters: Mapping[str, Any], key: str) -> int | None:
    value = parameters.get(key)
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgument(f"parameter {key!r} must be an integer, not {_cut(str(value))!r}") from None


def _float_parameter(parameters: Mapping[str, Any], key: str) -> float:
    """A number parameter (0 when absent). A number in a string is read ("0.99": tritonclient's gRPC
    sends no float parameters); other strings and bools are refused, not read as 0."""
    value = parameters.get(key)
    if value is None:
        return 0.0
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise InvalidArgument(f"parameter {key!r} must be a number between 0 and 1, not {_cut(str(value))!r}")


def _stats(name: str, s: core.VersionStatistics) -> dict[str, Any]:
    """One version's totals as Triton's ModelStatistics JSON.

    Triton charges a batch's compute to each request in it, and perf_analyzer insists that the compute
    input, infer and output counts are equal; fovea sums compute per batch, so each answered request
    is charged the mean batch time. Decoding and resizing are the compute input.
    """
    t = s.totals
    requests = t.requests
    compute_s = t.compute_s / t.batches * requests if t.batches else 0.0

    def duration(count: int, seconds: float) -> dict[str, int]:
        return {"count": count, "ns": int(seconds * 1e9)}

    return {
        "name": name,
        "version": str(s.version),
        "last_inference": int(t.last_inference * 1000),
        "inference_count": t.images,
        "execution_count": t.batches,
        "inference_stats": {
            "success": duration(requests, t.queue_s + t.preprocess_s + compute_s),
            "fail": duration(t.failures, 0.0),
            "queue": duration(requests, t.queue_s),
            "compute_input": duration(requests, t.preprocess_s),
            "compute_infer": duration(requests, compute_s),
            "compute_output": duration(requests, 0.0),
        },
    }
