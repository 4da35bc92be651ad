"""The blocking client."""

from __future__ import annotations

import threading
from typing import Any

import grpc
from fovea.client import _common, _health
from fovea.client._errors import FoveaError
from fovea.client._results import (
    ModelMetadata,
    ModelStatus,
    Prediction,
    metadata_from_response,
    models_from_response,
)
from fovea.client._retry import DEFAULT_TIMEOUT, Deadline, RetryPolicy, call_with_retry, resolve_timeout
from fovea.v1 import classifier_pb2, classifier_pb2_grpc


class Client:
    """A blocking client of a fovea server (``fovea.v1.ClassifierService``).

    One client holds one gRPC channel; it is thread-safe, and meant to be created once and reused.
    Use it as a context manager, or call `close` when done::

        from fovea.client import Client

        with Client("localhost:8500") as client:
            for p in client.predict(["cat.jpg", "photos/"], top_k=3):
                print(p.source, p.top[0].label, p.top[0].score)

    Every call has a deadline: its ``timeout`` argument, or the client's ``default_timeout`` when
    ``timeout`` is ``None``. There is no way to wait forever. Calls that fail with UNAVAILABLE or
    RESOURCE_EXHAUSTED are retried with exponential backoff and full jitter (see `RetryPolicy`), but
    never past the deadline. Every failure raises `FoveaError`, which carries the gRPC status code.

    Args:
        target: The server address, e.g. ``"localhost:8500"``, or a gRPC name such as
            ``"dns:///fovea-headless.ns.svc:8500"``; requests are balanced round-robin across every
            address the name resolves to.
        default_timeout: The deadline in seconds of calls that pass ``timeout=None``.
        max_message_bytes: The largest message the channel sends or receives (default 64 MiB).
            `predict` splits its images into several requests that each stay below it; keep it at or
            below the server's own limit.
        max_images_per_request: The most images per request. ``None`` asks the server (its
            ``GetModelMetadata`` answer, once per model) and falls back to 64.
        retry_policy: How to retry UNAVAILABLE and RESOURCE_EXHAUSTED; ``RetryPolicy(max_attempts=1)``
            disables retries.
        tls: Use TLS with the system's root certificates (implied by any of the next three).
        root_certificates: PEM root certificates, as bytes or a file path.
        private_key: The PEM private key of a client certificate, as bytes or a file path.
        certificate_chain: The PEM client certificate chain, as bytes or a file path.
        channel_options: Extra ``(key, value)`` gRPC channel arguments; they override fovea's.

    Raises:
        FoveaError: INVALID_ARGUMENT for a bad argument (e.g. an unreadable certificate file).
    """

    def __init__(
        self,
        target: str,
        *,
        default_timeout: float = DEFAULT_TIMEOUT,
        max_message_bytes: int = _common.DEFAULT_MAX_MESSAGE_BYTES,
        max_images_per_request: int | None = None,
        retry_policy: RetryPolicy | None = None,
        tls: bool = False,
        root_certificates: _common.PathOrBytes = None,
        private_key: _common.PathOrBytes = None,
        certificate_chain: _common.PathOrBytes = None,
        channel_options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self.target = target
        self.default_timeout = resolve_timeout(default_timeout, DEFAULT_TIMEOUT)
        self.max_message_bytes = max_message_bytes
        self.max_images_per_request = max_images_per_request
        self.retry_policy = retry_policy or RetryPolicy()
        options = _common.channel_options(max_message_bytes, channel_options)
        credentials = _common.channel_credentials(tls, root_certificates, private_key, certificate_chain)
        # A TLS client without a certificate reads an mTLS server's refusal as a closed socket.
        self._tls_without_client_cert = _common.tls_without_client_cert(
            tls, root_certificates, private_key, certificate_chain
        )
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = classifier_pb2_grpc.ClassifierServiceStub(self._channel)
        self._health_check = self._channel.unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.HealthCheckRequest.SerializeToString,
            response_deserializer=_health.HealthCheckResponse.FromString,
        )
        self._max_images_cache: dict[tuple[str, int, str], int] = {}
        self._lock = threading.Lock()
        self._closed = False

    # -- calls ---------------------------------------------------------------------------------

    def predict(
        self,
        images: Any,
        top_k: int | None = None,
        model: str | None = None,
        version: int | None = None,
        return_probabilities: bool = False,
        timeout: float | None = None,
        min_score: float | None = None,
        use_model_threshold: bool = False,
        version_label: str | None = None,
        route_key: str | None = None,
    ) -> list[Prediction]:
        """Classify images and return one `Prediction` per image, in input order.

        Args:
            images: One input or a list of inputs. An input is a file path (``str`` or
                ``os.PathLike``) of a JPEG, PNG, GIF or BMP file, sent as is; a folder, expanded to
                its image files (``.jpg .jpeg .png .bmp .gif``, sorted by name, subfolders not
                searched); encoded image ``bytes``; a numpy array ``[H, W]``, ``[H, W, C]`` or
                ``[N, H, W, C]`` (N images) of dtype uint8 or float32 on the 0..255 scale (other
                float dtypes are converted to float32), sent as raw pixels; or a PIL image, sent as
                raw RGB/RGBA/L pixels. Images of any size are accepted; the server resizes them.
            top_k: How many labels to return per image, 1 to the model's number of classes.
                ``None`` (or 0) lets the server choose: 5, or every class when there are fewer.
            model: The model name; ``None`` when the server serves a single model.
            version: The model version; ``None`` or 0 for the latest loaded one.
            return_probabilities: Also return every class probability.
            min_score: Answer only when sure: a prediction whose top score is below this (0..1)
                comes back with ``abstained=True`` (its labels are still there). ``None`` for no threshold.
            use_model_threshold: Use the threshold the trainer recorded for the model version (the
                lowest score reaching its target precision on validation) instead of ``min_score``.
            timeout: The deadline in seconds for the whole call, all sub-requests and retries
                included; ``None`` uses ``default_timeout``.
            version_label: A version label of the model's rollout.json (such as ``"stable"`` or
                ``"canary"``) instead of ``version``: NOT_FOUND for an unknown label,
                FAILED_PRECONDITION for a label naming a version that is not loaded.
            route_key: A sticky routing key (such as a user id), sent as ``x-fovea-route-key``: while
                rollout.json's traffic shares stand, the same key is always answered by the same label.

        Returns:
            A list of `Prediction`, one per image, in the order the images were given.

        Raises:
            FoveaError: INVALID_ARGUMENT for unreadable or unsupported input (before anything is
                sent) or input the server rejects; NOT_FOUND for an unknown model or version;
                DEADLINE_EXCEEDED when the deadline passes; UNAVAILABLE or RESOURCE_EXHAUSTED when
                retries cannot help; other codes as the server or channel report them.

        Inputs too large for one message are split into several requests (each within
        ``max_message_bytes`` and the per-request image limit) that are sent one after another; a
        single image larger than one message raises INVALID_ARGUMENT. All parts are answered by one
        model version: unless ``version`` is given, the version that answered the first part is
        asked for the rest, and if a hot reload retires it meanwhile the call starts over (ABORTED
        after 3 such starts).
        """
        deadline = Deadline(resolve_timeout(timeout, self.default_timeout))
        spec = _common.model_spec(model, version, version_label)
        metadata = _common.route_metadata(route_key)
        sources, images_pb = _common.encode_predict(images)
        max_images = self._max_images(spec, len(images_pb), deadline)
        plan = _common.plan_predict(
            sources,
            images_pb,
            top_k=top_k,
            spec=spec,
            return_probabilities=return_probabilities,
            min_score=min_score,
            use_model_threshold=use_model_threshold,
            max_message_bytes=self.max_message_bytes,
            max_images_per_request=max_images,
        )
        return plan.assemble(self._send(plan, deadline, metadata))

    def metadata(
        self, model: str | None = None, version: int | None = None, timeout: float | None = None
    ) -> ModelMetadata:
        """Describe a served model: labels, input size, backbone, loaded versions, training metrics.

        Args:
            model: The model name; ``None`` when the server serves a single model.
            version: The model version; ``None`` or 0 for the latest loaded one.
            timeout: The deadline in seconds; ``None`` uses ``default_timeout``.

        Returns:
            A `ModelMetadata`.

        Raises:
            FoveaError: NOT_FOUND for an unknown model or version, or any other RPC failure.
        """
        deadline = Deadline(resolve_timeout(timeout, self.default_timeout))
        request = classifier_pb2.GetModelMetadataRequest(model_spec=_common.model_spec(model, version))
        return metadata_from_response(self._call(self._stub.GetModelMetadata, request, deadline))

    def list_models(self, timeout: float | None = None) -> list[ModelStatus]:
        """List the models the server knows, sorted by name, with their loaded versions.

        Args:
            timeout: The deadline in seconds; ``None`` uses ``default_timeout``.

        Returns:
            A list of `ModelStatus`.

        Raises:
            FoveaError: on any RPC failure.
        """
        deadline = Deadline(resolve_timeout(timeout, self.default_timeout))
        response = self._call(self._stub.ListModels, classifier_pb2.ListModelsRequest(), deadline)
        return models_from_response(response)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """Ask the standard gRPC health service (``grpc.health.v1.Health/Check``) for a status.

        Args:
            service: The service to ask about; ``""`` means the server as a whole.
            timeout: The deadline in seconds; ``None`` uses ``default_timeout``. UNAVAILABLE is
                retried until then, so a server that is still starting gets the time to come up.

        Returns:
            ``"SERVING"``, ``"NOT_SERVING"``, ``"UNKNOWN"`` or ``"SERVICE_UNKNOWN"``.

        Raises:
            FoveaError: NOT_FOUND when the server does not know ``service``; UNIMPLEMENTED when it
                has no health service; DEADLINE_EXCEEDED or UNAVAILABLE when it cannot be reached.
        """
        deadline = Deadline(resolve_timeout(timeout, self.default_timeout))
        request = _health.HealthCheckRequest(service=service)
        return _health.status_name(self._call(self._health_check, request, deadline))

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel. Calls made afterwards raise `FoveaError` (FAILED_PRECONDITION)."""
        self._closed = True
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    # -- internals -----------------------------------------------------------------------------

    def _call(self, method, request, deadline: Deadline, metadata: _common.Metadata = None):
        if self._closed:
            raise FoveaError(grpc.StatusCode.FAILED_PRECONDITION, "the client is closed")
        return call_with_retry(
            lambda t: method(request, timeout=t, metadata=metadata),
            deadline,
            self.retry_policy,
            self._tls_without_client_cert,
        )

    def _send(
        self, plan: _common.PredictPlan, deadline: Deadline, metadata: _common.Metadata = None
    ) -> list[classifier_pb2.PredictResponse]:
        def call(request: classifier_pb2.PredictRequest) -> classifier_pb2.PredictResponse:
            return self._call(self._stub.Predict, request, deadline, metadata)

        if not plan.pins_version:
            return [call(request) for request in plan.requests]
        attempt = 0
        while True:
            first = call(plan.requests[0])
            try:
                return [first] + [call(r) for r in plan.pinned(first)]
            except FoveaError as err:
                if not plan.version_retired(err, first, attempt):
                    raise
            attempt += 1

    def _max_images(self, spec: classifier_pb2.ModelSpec | None, count: int, deadline: Deadline) -> int:
        if self.max_images_per_request is not None:
            return self.max_images_per_request
        if count <= 1:
            return 1
        key = _common.max_images_key(spec)
        with self._lock:
            cached = self._max_images_cache.get(key)
        if cached is not None:
            return cached
        request = classifier_pb2.GetModelMetadataRequest(model_spec=spec)
        try:
            response = self._call(self._stub.GetModelMetadata, request, deadline)
        except FoveaError as err:
            if err.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            response = None
        value = _common.max_images_from_metadata(response)
        with self._lock:
            self._max_images_cache[key] = value
        return value
