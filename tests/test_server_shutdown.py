"""`fovea serve` in a subprocess: the port line, SIGTERM with requests in flight, exit 0 within grace."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the server tests need the server extra")

from _serving import (
    client,
    export_slow,
    sample,
    serve_command,
    start_server,
    stop_server,
    subprocess_env,
    wait_serving,
    wait_until,
)
from fovea.client import FoveaError
from fovea.server.ports_line import parse_ports_line

DELAY = 0.4
GRACE = 15.0


@pytest.fixture
def serve_process(tmp_path: Path):
    export_slow(tmp_path, "slow", DELAY, 16)
    env = subprocess_env()
    env["FOVEA_MAX_BATCH_SIZE"] = "4"  # also checks that FOVEA_* variables are read
    proc = subprocess.Popen(
        serve_command(
            "--model-dir",
            str(tmp_path),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--max-in-flight-batches",
            "1",
            "--grace-period",
            str(GRACE),
            "--log-format",
            "json",
        ),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    try:
        yield proc, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def test_sigterm_finishes_in_flight_requests_and_exits_zero(serve_process) -> None:
    proc, stderr = serve_process
    line = proc.stdout.readline()
    ports = parse_ports_line(line)
    assert ports, f"no port line on stdout: {line!r}; stderr: {''.join(stderr)[-2000:]}"
    port = ports.grpc
    with client(port, max_images_per_request=8) as fovea:
        wait_serving(fovea)
        done = []

        def call(_: int) -> str:
            try:
                fovea.predict(np.zeros((16, 16, 3), np.uint8), timeout=60)
                return "OK"
            except FoveaError as exc:
                return str(exc)
            finally:
                done.append(1)

        with ThreadPoolExecutor(10) as pool:
            futures = [pool.submit(call, i) for i in range(10)]
            time.sleep(DELAY / 2)  # the first batch is computing, the rest are queued
            pending_at_signal = 10 - len(done)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        assert pending_at_signal >= 5, "the requests finished before SIGTERM; the test proved nothing"
        assert results == ["OK"] * 10
        rc = proc.wait(GRACE + 10)
        took = time.monotonic() - sent
    log = "".join(stderr)
    assert rc == 0, log[-3000:]
    assert took < GRACE, f"exit took {took:.1f}s, beyond the {GRACE}s grace period"
    assert '"message": "draining' in log and '"message": "stopped"' in log
    assert "Traceback" not in log, log[-3000:]


def test_bad_flag_values_are_one_line_errors(tmp_path: Path) -> None:
    env = subprocess_env()
    for args, expected in (
        (["--max-batch-size", "zero"], "--max-batch-size: cannot read 'zero'"),
        (["--model-dir", str(tmp_path), "--max-batch-size", "0"], "--max-batch-size must be at least 1"),
        ([], "--model-dir (or FOVEA_MODEL_DIR) is required"),
        (["--model-dir", str(tmp_path), "--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"),
    ):
        result = subprocess.run(serve_command(*args), env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, (args, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


def test_a_taken_port_is_a_one_line_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for flags, expected in (
            (
                ["--port", port, "--metrics-port", "0", "--http-port", "0"],
                f"cannot listen for gRPC on 127.0.0.1:{port}",
            ),
            (
                ["--port", "0", "--metrics-port", port, "--http-port", "0"],
                f"cannot serve metrics on 127.0.0.1:{port}",
            ),
            (
                ["--port", "0", "--metrics-port", "0", "--http-port", port],
                f"cannot serve HTTP on 127.0.0.1:{port}",
            ),
        ):
            args = serve_command("--model-dir", str(tmp_path), "--host", "127.0.0.1", *flags)
            result = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, timeout=120)
            assert result.returncode == 1, result.stderr
            assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_drain_that_outlasts_the_grace_period_still_stops(tmp_path: Path, caplog) -> None:
    # The drain's timeout must end the drain, not the shutdown (on 3.10 asyncio.wait_for raises
    # asyncio.TimeoutError, which the builtin TimeoutError does not catch there).
    export_slow(tmp_path, "slow", delay_s=3.0)
    server = start_server(tmp_path, max_batch_size=1, batch_timeout_ms=0)
    with client(server.port) as fovea, ThreadPoolExecutor(1) as pool:
        wait_serving(fovea)
        # 24 px: resized on the way in, so the preprocess metric tells when it has passed that step.
        pool.submit(lambda: fovea.predict(np.zeros((24, 24, 3), np.uint8), timeout=60))
        wait_until(
            lambda: sample(server, "fovea_preprocess_duration_seconds_count", model="slow") >= 1,
            what="the request to reach the model",
        )
        with caplog.at_level("WARNING", logger="fovea.server.app"):
            stop_server(server, grace=0.2)
    assert "ended with requests still running" in caplog.text
