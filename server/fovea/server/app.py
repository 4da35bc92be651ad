"""Wiring: the grpc.aio server, health, reflection, metrics HTTP, the model manager, and the drain."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from aiohttp import web
from fovea.inference import _pool as inference_pool
from fovea.inference import grpc_service_pb2_grpc
from fovea.server import background, loader, rpc, tfserving, tracing, v2, v2_grpc, v2_http
from fovea.server.batcher import warmup_sizes
from fovea.server.config import Settings
from fovea.server.core import Core
from fovea.server.errors import clip
from fovea.server.manager import ModelManager
from fovea.server.metrics import Metrics
from fovea.server.ports_line import format_ports_line
from fovea.server.servicer import SERVICE_NAME, ClassifierServicer
from fovea.server.source import ModelSource
from fovea.v1 import classifier_pb2_grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

log = logging.getLogger(__name__)

HEALTH_SERVICES = (
    "",
    SERVICE_NAME,
    v2_grpc.SERVICE_NAME,
    tfserving.PREDICTION_SERVICE,
    tfserving.MODEL_SERVICE,
)
# The liveness probe's service: SERVING from start until shutdown, whatever the models do. Liveness
# must not read readiness: a storage hiccup that unloads models would otherwise get every replica
# restarted mid-recovery.
LIVENESS_SERVICE = "liveness"


def grpc_options(s: Settings) -> list[tuple[str, int]]:
    limit = s.max_message_mb * 1024 * 1024
    options = [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Let clients ping as often as every 10 s without being sent GOAWAY(too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # A second server on a taken port must fail, not silently share it.
        ("grpc.so_reuseport", 0),
    ]
    if s.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(s.max_connection_age_grace_s * 1000)),
        ]
    return options


class _ReflectionPool:
    """Reflection over the vendored `inference.*` protos (a private pool) and everything else (default).

    The private pool is asked first: in a process that also loaded tritonclient, the default pool holds
    Triton's copy of the same files, without OIP's ModelMetadataResponse.properties.
    """

    def __init__(self) -> None:
        self._pools = (inference_pool.POOL, descriptor_pool.Default())

    def _first(self, method: str, *args):
        for pool in self._pools:
            try:
                return getattr(pool, method)(*args)
            except KeyError:
                continue
        raise KeyError(args[0] if args else method)

    def FindFileByName(self, name: str):
        return self._first("FindFileByName", name)

    def FindFileContainingSymbol(self, symbol: str):
        return self._first("FindFileContainingSymbol", symbol)

    def FindMessageTypeByName(self, name: str):
        return self._first("FindMessageTypeByName", name)

    def FindExtensionByNumber(self, message, number: int):
        return self._first("FindExtensionByNumber", message, number)

    def FindAllExtensions(self, message):
        return self._first("FindAllExtensions", message)


class StartupError(Exception):
    """The server could not start (a port is taken, a certificate is unreadable); one line for the CLI."""


def default_gpu_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below max_batch_size, then max_batch_size itself."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch_size)


class Server:
    """One fovea server: start(), then stop(grace) drains it. Several can run in one process."""

    def __init__(self, settings: Settings, load=None) -> None:
        self.device = loader.configure_device(settings.gpu_memory_limit_mb)
        if self.device == "GPU" and not settings.allowed_batch_sizes:
            # On a GPU every new batch shape costs autotuning, so batches are padded to a few sizes.
            sizes = default_gpu_batch_sizes(settings.max_batch_size)
            log.info("GPU: padding batches to sizes %s (set --allowed-batch-sizes to change)", sizes)
            settings = dataclasses.replace(settings, allowed_batch_sizes=sizes)
        if load is None:
            # XLA compiles per shape: the allowed sizes, else powers of two (what a steady closed
            # loop of that many callers forms); other sizes run the plain signature.
            xla_sizes: Sequence[int] = ()
            if settings.xla and settings.warmup and settings.allowed_batch_sizes:
                xla_sizes = warmup_sizes(settings.max_batch_size, settings.allowed_batch_sizes)
            elif settings.xla and settings.warmup:
                xla_sizes = default_gpu_batch_sizes(settings.max_batch_size)
            load = functools.partial(loader.load, xla_sizes=xla_sizes)
        self.settings = settings
        self.metrics = Metrics()
        self.metrics.queue_capacity.set(settings.max_queue_size)
        self.health = health.aio.HealthServicer()
        self.source = ModelSource(settings.model_dir, loader.GFileStorage(), settings.model_name)
        self.manager = ModelManager(settings, self.metrics, self.source, load, self._on_ready_change)
        self.core = Core(settings, self.manager, self.metrics)
        self.v2 = v2.V2(self.core)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http: web.AppRunner | None = None
        self.rest: v2_http.V2Http | None = None
        self._server: grpc.aio.Server | None = None
        self._draining = False
        self._health_tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        s = self.settings
        if not s.wait_for_model_dir:
            await self._require_a_model()
        server = grpc.aio.server(options=grpc_options(s), maximum_concurrent_rpcs=s.max_concurrent_rpcs)
        classifier_pb2_grpc.add_ClassifierServiceServicer_to_server(
            ClassifierServicer(self.core, self.metrics), rpc.tolerant(server)
        )
        # Every protocol's servicer is registered through rpc.tolerant: a request that does not parse
        # reaches its RpcHandler and is answered INVALID_ARGUMENT, counted, instead of UNKNOWN.
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            v2_grpc.InferenceServicer(self.v2, self.metrics), rpc.tolerant(server)
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            tfserving.PredictionServicer(self.core, self.metrics), rpc.tolerant(server)
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            tfserving.ModelServicer(self.core, self.metrics), rpc.tolerant(server)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if s.reflection:
            names = (
                SERVICE_NAME,
                v2_grpc.SERVICE_NAME,
                tfserving.PREDICTION_SERVICE,
                tfserving.MODEL_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(names, server, pool=_ReflectionPool())
        address = f"{s.host}:{s.port}"
        try:
            if s.tls_cert:
                credentials = grpc.ssl_server_credentials(
                    [(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())],
                    root_certificates=Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None,
                    require_client_auth=bool(s.tls_client_ca),
                )
                self.port = server.add_secure_port(address, credentials)
            else:
                self.port = server.add_insecure_port(address)
        except (RuntimeError, OSError):
            await server.stop(None)
            hint = (
                "is the port in use, or the TLS certificate or key invalid?"
                if s.tls_cert
                else "is the port in use?"
            )
            raise StartupError(f"cannot listen for gRPC on {address}; {hint}") from None
        if s.metrics_port >= 0:
            metrics_address = f"{s.metrics_host or s.host}:{s.metrics_port}"
            try:
                # Over TLS (and mTLS) exactly when gRPC is: same certificate, key and client CA.
                self.metrics_port = self.metrics.serve_http(
                    s.metrics_host or s.host, s.metrics_port, s.tls_cert, s.tls_key, s.tls_client_ca
                )
            except OSError as exc:
                await server.stop(None)
                raise StartupError(
                    f"cannot serve metrics on {metrics_address}: {exc.strerror or exc}"
                ) from None
        if s.http_port >= 0:
            try:
                await self._start_http()
            except (OSError, ssl.SSLError) as exc:
                await server.stop(None)
                self.metrics.close()
                if self._http is not None:
                    await self._http.cleanup()
                raise StartupError(
                    f"cannot serve HTTP on {s.host}:{s.http_port}: {getattr(exc, 'strerror', None) or exc}"
                ) from None
        await server.start()
        self._server = server
        tls = " (mTLS)" if s.tls_client_ca else " (TLS)" if s.tls_cert else ""
        log.info(
            "serving %s and %s on %s, grpc port %d%s, http port %s, metrics port %s%s; models from %s",
            SERVICE_NAME,
            v2_grpc.SERVICE_NAME,
            s.host,
            self.port,
            tls,
            self.http_port,
            self.metrics_port,
            tls if self.metrics_port is not None else "",
            s.model_dir,
        )
        self.manager.start()

    async def _require_a_model(self) -> None:
        """--no-wait-for-model-dir: refuse to start when --model-dir holds no version to serve."""
        source, loop = self.source, asyncio.get_running_loop()
        try:
            listed = await loop.run_in_executor(None, source.scan)
        except Exception as exc:
            raise StartupError(
                f"cannot read --model-dir {source.base}: {clip(exc, 300, quote=False)}"
            ) from None
        if not any(listed.values()):
            _, why = await loop.run_in_executor(None, source.nothing_found)
            raise StartupError(f"{why}; not waiting for one (--no-wait-for-model-dir)")

    async def _start_http(self) -> None:
        """The v2 REST routes on the same event loop as gRPC, so both share the core and its batchers."""
        s = self.settings
        self.rest = v2_http.V2Http(
            self.v2, self.metrics, s.max_message_mb * 1024 * 1024, s.max_concurrent_rpcs, s.http_body_timeout
        )
        # By cleanup time the core has drained, so what is still open is idle or nearly done.
        self._http = web.AppRunner(
            self.rest.app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=min(5.0, s.grace_period),
            # aiohttp would inflate a Content-Encoding on the event loop, bomb and all: v2_http inflates
            # on its parse thread, bounded by the message limit (http_body.inflate).
            auto_decompress=False,
            # aiohttp closes a connection idle this long, including one still sending its headers.
            keepalive_timeout=s.http_body_timeout,
            # After an early answer (429, 408), unread body is drained at most this long, then the
            # connection closes (aiohttp's default, 10 s, would let a slow client keep it).
            lingering_time=1.0,
            logger=v2_http.aiohttp_logger,
        )
        await self._http.setup()
        context = v2_http.ssl_context(s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert else None
        site = web.TCPSite(self._http, s.host, s.http_port, ssl_context=context, reuse_port=False)
        await site.start()
        self.http_port = int(self._http.addresses[0][1])

    def _on_ready_change(self, ready: bool) -> None:
        if self._draining:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.metrics.ready.set(1 if ready else 0)
        log.info("health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status))
        for service in HEALTH_SERVICES:
            task = asyncio.get_running_loop().create_task(self.health.set(service, status))
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING first, refuse new work, finish in-flight RPCs within the grace period."""
        grace = self.settings.grace_period if grace is None else grace
        self._draining = True
        self.metrics.ready.set(0)
        await self.health.enter_graceful_shutdown()
        log.info("draining: health NOT_SERVING, refusing new requests, waiting up to %gs", grace)
        start = time.monotonic()
        # The gRPC server keeps answering while the core drains, so health checks see NOT_SERVING
        # and new calls get a clear UNAVAILABLE instead of a refused connection.
        if not await self.core.drain(grace):
            log.warning(
                "grace period of %gs ended with requests still running; they were answered UNAVAILABLE", grace
            )
        if self._server is not None:
            # A short grace even when the drain used it all: calls that arrived meanwhile are being
            # answered UNAVAILABLE by the core, and need a moment to send it rather than be cancelled.
            await self._server.stop(max(0.5, grace - (time.monotonic() - start)))
        if self._http is not None:
            await self._http.cleanup()
        if self.rest is not None:
            # The parse thread and process: after the port closed, so no request is still parsing.
            await asyncio.get_running_loop().run_in_executor(None, self.rest.close)
        await self.manager.close()
        self.metrics.close()
        log.info("stopped")


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then drain and return 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Installed before anything starts, so a signal during start-up still drains and exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tracing.setup()  # only with OTEL_* set and the otel extra installed
    server = Server(settings)
    # Before start(), which loads the first version: see freeze_runtime_objects for why not after.
    background.freeze_runtime_objects()
    await server.start()
    # The one stdout line tests and scripts read to find the bound ports.
    print(format_ports_line(server.port, server.metrics_port, server.http_port), flush=True)
    await stop.wait()
    # The handlers stay installed: a repeated signal during the drain must not kill the process.
    log.info("signal received")
    await server.stop()
    sys.stdout.flush()
    return 0
