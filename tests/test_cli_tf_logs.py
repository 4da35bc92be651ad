"""`fovea serve` starts without TensorFlow's native start-up lines (oneDNN, cuInit), unless --tf-logs."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow", reason="the server tests need the server extra")

from _serving import subprocess_env

# absl's native log format: "I0000 00:00:1795646070.735586   15324 port.cc:153] oneDNN custom ..."
NATIVE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\S+\s+\d+ \S+:\d+\]", re.M)


def _serve_output(tmp_path, *flags: str) -> str:
    argv = [sys.executable, "-m", "fovea.cli", "serve", "--model-dir", str(tmp_path), "--port", "0"]
    argv += ["--metrics-port", "-1", "--http-port", "-1", "--log-format", "text", *flags]
    proc = subprocess.Popen(
        argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ports = proc.stdout.readline()  # printed once started, after TensorFlow's start-up
        assert ports.startswith("fovea serve: grpc_port="), ports
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    return err


def test_serve_hides_tensorflows_startup_lines(tmp_path):
    err = _serve_output(tmp_path)
    assert not NATIVE_LINE.search(err), err
    assert "cuInit" not in err and "oneDNN" not in err, err
    assert "fovea.server.app" in err  # fovea's own log is untouched


def test_tf_logs_keeps_them(tmp_path):
    err = _serve_output(tmp_path, "--tf-logs")
    assert NATIVE_LINE.search(err), err
