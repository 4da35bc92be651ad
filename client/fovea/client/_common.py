"""What the sync and the asyncio clients share: channel options, credentials, request building."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from fovea.client import _split
from fovea.client._errors import FoveaError, invalid_argument
from fovea.client._inputs import encode_inputs
from fovea.client._results import Prediction, predictions_from_response
from fovea.contract.rollout import ROUTE_KEY_HEADER
from fovea.v1 import classifier_pb2

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Used when the server does not say how many images it takes per request.
FALLBACK_MAX_IMAGES_PER_REQUEST = 64

# Round-robin over every address a name resolves to (e.g. a headless Kubernetes Service), instead of
# gRPC's default pick_first, which would send all traffic to one pod. Harmless for a single address.
ROUND_ROBIN_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

PathOrBytes = bytes | str | os.PathLike | None
Metadata = tuple[tuple[str, str], ...] | None  # gRPC request metadata

# How many times a split call starts over when the version its first part pinned is retired before
# the other parts are answered (a hot reload); each start costs one request, all within the deadline.
VERSION_PIN_ATTEMPTS = 3


def channel_options(max_message_bytes: int, extra: list[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    if not isinstance(max_message_bytes, int) or max_message_bytes <= 0:
        raise invalid_argument(f"max_message_bytes must be a positive int, not {max_message_bytes!r}")
    options: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.service_config": ROUND_ROBIN_SERVICE_CONFIG,
    }
    options.update(dict(extra or []))
    return list(options.items())


def _read_pem(value: PathOrBytes, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise invalid_argument(f"{what}: cannot read {value}: {exc.strerror or exc}") from None


def channel_credentials(
    tls: bool, root_certificates: PathOrBytes, private_key: PathOrBytes, certificate_chain: PathOrBytes
) -> grpc.ChannelCredentials | None:
    """TLS credentials if any TLS argument is given, else None (plaintext)."""
    if not (tls or root_certificates or private_key or certificate_chain):
        return None
    if (private_key is None) != (certificate_chain is None):
        raise invalid_argument("a client certificate needs both private_key and certificate_chain")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(root_certificates, "root_certificates"),
        private_key=_read_pem(private_key, "private_key"),
        certificate_chain=_read_pem(certificate_chain, "certificate_chain"),
    )


def tls_without_client_cert(
    tls: bool, root_certificates: PathOrBytes, private_key: PathOrBytes, certificate_chain: PathOrBytes
) -> bool:
    """Whether the channel is TLS but presents no client certificate (what an mTLS server refuses)."""
    return bool(tls or root_certificates) and certificate_chain is None


def model_spec(
    model: str | None, version: int | None, version_label: str | None = None
) -> classifier_pb2.ModelSpec | None:
    if model is not None and not isinstance(model, str):
        raise invalid_argument(f"model must be a name (str), not {model!r}")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
        raise invalid_argument(f"version must be a positive int (or 0/None for the latest), not {version!r}")
    if version_label is not None and not isinstance(version_label, str):
        raise invalid_argument(f"version_label must be a label (str), not {version_label!r}")
    if version and version_label:
        # The server refuses both too; saying it here names the arguments the caller wrote.
        raise invalid_argument(f"give version ({version}) or version_label ({version_label!r}), not both")
    if not model and not version and not version_label:
        return None
    return classifier_pb2.ModelSpec(name=model or "", version=version or 0, version_label=version_label or "")


def route_metadata(route_key: str | None) -> Metadata:
    """The request metadata carrying a sticky routing key (rollout.json's traffic shares), if any."""
    if route_key is None or route_key == "":
        return None
    if not isinstance(route_key, str):
        raise invalid_argument(f"route_key must be a str (such as a user id), not {route_key!r}")
    return ((ROUTE_KEY_HEADER, route_key),)


def max_images_key(spec: classifier_pb2.ModelSpec | None) -> tuple[str, int, str]:
    """The per-request image limit is cached per model, version and label."""
    return (spec.name, spec.version, spec.version_label) if spec is not None else ("", 0, "")


@dataclass
class PredictPlan:
    """A predict call, encoded and split into requests.

    A call split into several requests must not mix model versions when the server swaps versions
    mid-call. Unless the caller named a version, the first request is sent alone and the others are
    sent `pinned` to the model and version that answered it; if that version is retired before they
    are answered (NOT_FOUND), the whole call starts over (`version_retired`).
    """

    sources: list[str]
    requests: list[classifier_pb2.PredictRequest]
    ranges: list[range]
    return_probabilities: bool

    @property
    def pins_version(self) -> bool:
        """A label or traffic shares choose the version per request: a split call pins it too."""
        spec = self.requests[0].model_spec
        return len(self.requests) > 1 and spec.version == 0

    def pinned(self, first: classifier_pb2.PredictResponse) -> list[classifier_pb2.PredictRequest]:
        """The requests after the first, each naming the model and version that answered the first.

        Set in place, not copied (the parts carry the images, up to the message limit each): the plan
        owns them, and a call that starts over pins them again; the first request stays unpinned.
        The label is dropped (a request naming a version and a label is refused): a label moved
        mid-call must not mix versions either."""
        rest = self.requests[1:]
        answered = classifier_pb2.ModelSpec(name=first.model_spec.name, version=first.model_spec.version)
        for request in rest:
            request.model_spec.CopyFrom(answered)
        return rest

    @staticmethod
    def version_retired(err: FoveaError, first: classifier_pb2.PredictResponse, attempt: int) -> bool:
        """Whether a pinned part failed because its version went away, and the call may start over;
        raises ABORTED once the version changed under the call `VERSION_PIN_ATTEMPTS` times."""
        if err.code != grpc.StatusCode.NOT_FOUND:
            return False
        if attempt + 1 < VERSION_PIN_ATTEMPTS:
            return True
        spec = first.model_spec
        raise FoveaError(
            grpc.StatusCode.ABORTED,
            f"version {spec.version} of model {spec.name!r} was retired before the other parts of the "
            f"call were answered, {VERSION_PIN_ATTEMPTS} times in a row (hot reloads); the parts of one "
            f"call must come from one version. Last error: {err}",
        ) from err

    def assemble(self, responses: list[classifier_pb2.PredictResponse]) -> list[Prediction]:
        out: list[Prediction] = []
        for request, span, response in zip(self.requests, self.ranges, responses, strict=True):
            if len(response.predictions) != len(request.images):
                raise FoveaError(
                    grpc.StatusCode.INTERNAL,
                    f"the server returned {len(response.predictions)} predictions for "
                    f"{len(request.images)} images",
                )
            out.extend(
                predictions_from_response(
                    response, [self.sources[i] for i in span], self.return_probabilities
                )
            )
        return out


def encode_predict(images: Any) -> tuple[list[str], list[classifier_pb2.Image]]:
    encoded = encode_inputs(images)
    return [e.source for e in encoded], [e.image for e in encoded]


def plan_predict(
    sources: list[str],
    images: list[classifier_pb2.Image],
    *,
    top_k: int | None,
    spec: classifier_pb2.ModelSpec | None,
    return_probabilities: bool,
    max_message_bytes: int,
    min_score: float | None = None,
    use_model_threshold: bool = False,
    max_images_per_request: int,
) -> PredictPlan:
    if top_k is None:
        top_k = 0  # the server's default: 5, or the number of classes when there are fewer
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise invalid_argument(f"top_k must be a positive int (None = the server's default), not {top_k!r}")
    if min_score is not None and (
        isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not 0 <= min_score <= 1
    ):
        raise invalid_argument(
            f"min_score must be a number between 0 and 1 (None: no threshold), not {min_score!r}"
        )
    base = classifier_pb2.PredictRequest(
        model_spec=spec, top_k=top_k, return_probabilities=bool(return_probabilities),
        min_score=float(min_score or 0.0), use_model_threshold=bool(use_model_threshold),
    )  # fmt: skip
    ranges = _split.split(
        [image.ByteSize() for image in images],
        sources,
        base_size=base.ByteSize(),
        max_message_bytes=max_message_bytes,
        max_images=max(1, max_images_per_request),
    )
    requests = []
    for span in ranges:
        request = classifier_pb2.PredictRequest()
        request.CopyFrom(base)
        request.images.extend(images[i] for i in span)
        requests.append(request)
    return PredictPlan(sources, requests, ranges, bool(return_probabilities))


def max_images_from_metadata(response: classifier_pb2.GetModelMetadataResponse | None) -> int:
    if response is None or response.max_images_per_request <= 0:
        return FALLBACK_MAX_IMAGES_PER_REQUEST
    return int(response.max_images_per_request)
