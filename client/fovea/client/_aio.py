"""The asyncio client: the same surface as `Client`, with coroutines."""

from __future__ import annotations

import asyncio
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
from fovea.client._retry import (
    DEFAULT_TIMEOUT,
    Deadline,
    RetryPolicy,
    call_with_retry_async,
    resolve_timeout,
)
from fovea.v1 import classifier_pb2, classifier_pb2_grpc


class AsyncClient:
    """An asyncio client of a fovea server (``fovea.v1.ClassifierService``), the twin of `Client`.

    Create and use it inside a running event loop (the gRPC channel is bound to the loop of its
    first call); use it as an async context manager, or ``await client.close()`` when done::

        from fovea.client import AsyncClient

        async with AsyncClient("localhost:8500") as client:
            predictions = await client.predict(["cat.jpg", "dog.png"], top_k=3)

    Deadlines, retries, errors and arguments are exactly those of `Client`; the one difference is
    that `predict` sends the sub-requests of a split input concurrently (at most
    ``max_concurrent_requests`` at a time) and reassembles the results in input order.

    Args:
        target: The server address, e.g. ``"localhost:8500"`` or ``"dns:///fovea-headless.ns.svc:8500"``
            (balanced round-robin across every address the name resolves to).
        default_timeout: The deadline in seconds of calls that pass ``timeout=None``.
        max_message_bytes: The largest message the channel sends or receives (default 64 MiB).
        max_images_per_request: The most images per request; ``None`` asks the server, falling back to 64.
        max_concurrent_requests: How many sub-requests of one `predict` call may be in flight at once.
        retry_policy: How to retry UNAVAILABLE and RESOURCE_EXHAUSTED.
        tls: Use TLS with the system's root certificates (implied by any of the next three).
        root_certificates: PEM root certificates, as bytes or a file path.
        private_key: The PEM private key of a client certificate, as bytes or a file path.
        certificate_chain: The PEM client certificate chain, as bytes or a file path.
        channel_options: Extra ``(key, value)`` gRPC channel arguments; they override fovea's.
    """

    def __init__(
        self,
        target: str,
        *,
        default_timeout: float = DEFAULT_TIMEOUT,
        max_message_bytes: int = _common.DEFAULT_MAX_MESSAGE_BYTES,
        max_images_per_request: int | None = None,
        max_concurrent_requests: int = 4,
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
        self.max_concurrent_requests = max(1, int(max_concurrent_requests))
        self.retry_policy = retry_policy or RetryPolicy()
        self._options = _common.channel_options(max_message_bytes, channel_options)
        self._credentials = _common.channel_credentials(
            tls, root_certificates, private_key, certificate_chain
        )
        # A TLS client without a certificate reads an mTLS server's refusal as a closed socket.
        self._tls_without_client_cert = _common.tls_without_client_cert(
            tls, root_certificates, private_key, certificate_chain
        )
        self._channel: grpc.aio.Channel | None = None
        self._max_images_cache: dict[tuple[str, int, str], int] = {}
        self._closed = False

    # -- calls ---------------------------------------------------------------------------------

    async def predict(
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
            images: One input or a list of inputs: file paths, folders (their ``.jpg .jpeg .png
                .bmp .gif`` files, sorted by name), encoded image ``bytes``, numpy arrays ``[H, W]``,
                ``[H, W, C]`` or ``[N, H, W, C]`` (uint8 or float32 on the 0..255 scale), or PIL
                images. See `Client.predict`.
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
            FoveaError: as `Client.predict`. When one sub-request fails, the others are cancelled.

        Sub-requests run concurrently (at most ``max_concurrent_requests``), except that when
        ``version`` is not given the first one is answered before the others are sent, pinned to
        the version that answered it, so that one call never mixes model versions (see
        `Client.predict`).
        """
        deadline = Deadline(resolve_timeout(timeout, self.default_timeout))
        spec = _common.model_spec(model, version, version_label)
        metadata = _common.route_metadata(route_key)
        sources, images_pb = _common.encode_predict(images)
        max_images = await self._max_images(spec, len(images_pb), deadline)
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
        return plan.assemble(await self._send(plan, deadline, metadata))

    async def metadata(
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
        return metadata_from_response(await self._call(self._stub().GetModelMetadata, request, deadline))

    async def list_models(self, timeout: float | None = None) -> list[ModelStatus]:
        """List the models the server knows, sorted by name, with their loaded versions.

        Args:
            timeout: The deadline in seconds; ``None`` uses ``default_timeout``.

        Returns:
            A list of `ModelStatus`.

        Raises:
            FoveaError: on any RPC failure.
        """
        deadline = Deadline(resolve_timeout(timeout, self.default_timeout))
        request = classifier_pb2.ListModelsRequest()
        return models_from_response(await self._call(self._stub().ListModels, request, deadline))

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """Ask the standard gRPC health service (``grpc.health.v1.Health/Check``) for a status.

        Args:
            service: The service to ask about; ``""`` means the server as a whole.
            timeout: The deadline in seconds; ``None`` uses ``default_timeout``.

        Returns:
            ``"SERVING"``, ``"NOT_SERVING"``, ``"UNKNOWN"`` or ``"SERVICE_UNKNOWN"``.

        Raises:
            FoveaError: NOT_FOUND when the server does not know ``service``; UNIMPLEMENTED when it
                has no health service; DEADLINE_EXCEEDED or UNAVAILABLE when it cannot be reached.
        """
        deadline = Deadline(resolve_timeout(timeout, self.default_timeout))
        check = self._get_channel().unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.HealthCheckRequest.SerializeToString,
            response_deserializer=_health.HealthCheckResponse.FromString,
        )
        request = _health.HealthCheckRequest(service=service)
        return _health.status_name(await self._call(check, request, deadline))

    # -- lifecycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the channel, cancelling calls in flight. Later calls raise `FoveaError`."""
        self._closed = True
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r})"

    # -- internals -----------------------------------------------------------------------------

    def _get_channel(self) -> grpc.aio.Channel:
        if self._closed:
            raise FoveaError(grpc.StatusCode.FAILED_PRECONDITION, "the client is closed")
        if self._channel is None:
            # Created lazily so that it binds to the event loop that actually runs the calls.
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=self._options)
        return self._channel

    def _stub(self) -> classifier_pb2_grpc.ClassifierServiceStub:
        return classifier_pb2_grpc.ClassifierServiceStub(self._get_channel())

    async def _call(self, method, request, deadline: Deadline, metadata: _common.Metadata = None):
        if self._closed:
            raise FoveaError(grpc.StatusCode.FAILED_PRECONDITION, "the client is closed")
        return await call_with_retry_async(
            lambda t: method(request, timeout=t, metadata=metadata),
            deadline,
            self.retry_policy,
            self._tls_without_client_cert,
        )

    async def _send(
        self, plan: _common.PredictPlan, deadline: Deadline, metadata: _common.Metadata = None
    ) -> list[classifier_pb2.PredictResponse]:
        stub = self._stub()
        if not plan.pins_version:
            return await self._gather(stub, plan.requests, deadline, metadata)
        attempt = 0
        while True:
            first = await self._call(stub.Predict, plan.requests[0], deadline, metadata)
            try:
                return [first, *await self._gather(stub, plan.pinned(first), deadline, metadata)]
            except FoveaError as err:
                if not plan.version_retired(err, first, attempt):
                    raise
            attempt += 1

    async def _gather(
        self,
        stub,
        requests: list[classifier_pb2.PredictRequest],
        deadline: Deadline,
        metadata: _common.Metadata = None,
    ) -> list[classifier_pb2.PredictResponse]:
        """Send requests concurrently, at most `max_concurrent_requests` at once; the first failure
        cancels the rest."""
        limit = asyncio.Semaphore(self.max_concurrent_requests)

        async def send(request: classifier_pb2.PredictRequest) -> classifier_pb2.PredictResponse:
            async with limit:
                return await self._call(stub.Predict, request, deadline, metadata)

        tasks = [asyncio.ensure_future(send(request)) for request in requests]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def _max_images(self, spec: classifier_pb2.ModelSpec | None, count: int, deadline: Deadline) -> int:
        if self.max_images_per_request is not None:
            return self.max_images_per_request
        if count <= 1:
            return 1
        key = _common.max_images_key(spec)
        cached = self._max_images_cache.get(key)
        if cached is not None:
            return cached
        request = classifier_pb2.GetModelMetadataRequest(model_spec=spec)
        try:
            response = await self._call(self._stub().GetModelMetadata, request, deadline)
        except FoveaError as err:
            if err.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            response = None
        value = _common.max_images_from_metadata(response)
        self._max_images_cache[key] = value
        return value
