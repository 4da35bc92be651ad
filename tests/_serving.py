"""Helpers for the server's integration tests: a background event loop, servers on port 0, slow models.

One process-wide event loop runs every in-process server, so grpc.aio never sees two loops; tests talk
to the servers from their own thread with blocking gRPC calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from conftest import subprocess_env as subprocess_env  # re-exported: one definition for all tests

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="fovea-test-loop", daemon=True).start()
        return _loop


def run(coro, timeout: float = 120.0) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, background_loop()).result(timeout)


def start_server(models_dir: Path, **overrides: Any):
    """A real fovea server on 127.0.0.1 with gRPC, metrics and REST on port 0; returns the started Server."""
    from fovea.server.app import Server
    from fovea.server.config import Settings

    values = {
        "model_dir": str(models_dir),
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "http_port": 0,
        "poll_interval": 0.2,
        "xla": False,  # compiling every batch size costs seconds per server; test_server_xla.py covers it
    }
    values.update(overrides)

    async def _start():
        server = Server(Settings(**values))
        await server.start()
        return server

    return run(_start())


def stop_server(server, grace: float = 5.0) -> None:
    run(server.stop(grace), timeout=grace + 60)


@contextlib.contextmanager
def serving(models_dir: Path, **overrides: Any) -> Iterator[Any]:
    """start_server, wait until it is SERVING (a model loaded and warm), and stop it afterwards."""
    server = start_server(models_dir, **overrides)
    try:
        with client(server.port) as c:
            wait_serving(c)
        yield server
    finally:
        stop_server(server)


def wait_until(
    predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def sample(server, name: str, **labels: str) -> float:
    """A metric's current value from the server's own registry (0 when never set)."""
    value = server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}")


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fovea.cli", "serve", *args]


def export_slow(models_dir: Path, name: str = "slow", delay_s: float = 0.3, input_size: int = 16) -> Path:
    """Publish a real SavedModel whose every call takes at least `delay_s` (a busy wait in the graph)."""
    import tensorflow as tf
    from _models import LABELS, build_tiny_model
    from fovea.trainer.export import export_model

    class SlowModel(tf.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def __call__(self, x, training=False):
            start = tf.timestamp()
            # tf.timestamp() is re-evaluated every iteration, so the loop spins until delay_s passed.
            (end,) = tf.while_loop(lambda t: t < start + delay_s, lambda t: [tf.timestamp()], [start])
            with tf.control_dependencies([end]):
                x = tf.identity(x)
            return self.inner(x, training=False)

    path = export_model(
        SlowModel(build_tiny_model(input_size)),
        models_dir=str(models_dir),
        name=name,
        labels=list(LABELS),
        input_size=(input_size, input_size),
        backbone="tiny-cnn-slow",
    )
    return Path(path)


def client(port: int, host: str = "127.0.0.1", **kwargs: Any):
    """The real fovea client, without retries, so a failure the server returns is never hidden."""
    from fovea.client import Client, RetryPolicy

    kwargs.setdefault("retry_policy", RetryPolicy(max_attempts=1))
    return Client(f"{host}:{port}", **kwargs)


def wait_serving(c, timeout: float = 60.0) -> None:
    wait_until(lambda: c.health(timeout=5) == "SERVING", timeout=timeout, what="health SERVING")
