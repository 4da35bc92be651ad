"""A `fovea serve` subprocess on 127.0.0.1, started the way a user would start it.

The demo and the benchmarks both need one: ports chosen by the OS (--port 0 --metrics-port 0) and read
back from the line the server prints, then readiness taken from grpc.health.v1 through the thin client.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fovea.server.ports_line import parse_ports_line


class ServerStartError(RuntimeError):
    """The server exited, or did not listen or become SERVING in time; the message says which."""


class ServerProcess:
    """One `fovea serve --model-dir MODELS --port 0 --metrics-port 0 [EXTRA...]` child process."""

    def __init__(
        self,
        models_dir: Path,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.argv = [
            sys.executable, "-m", "fovea.cli", "serve", "--model-dir", str(models_dir),
            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "0", *extra,
        ]  # fmt: skip
        self.env = dict(env) if env is not None else None
        self.echo = echo
        self.output: list[str] = []
        self.grpc_port = 0
        self.metrics_port = 0
        self.http_port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, ready_timeout: float) -> ServerProcess:
        """Start the process and return once it is SERVING; on failure it is killed and raises."""
        process = self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        ports_seen = threading.Event()

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                line = line.rstrip()
                self.output.append(line)
                if self.echo:
                    self.echo(line)
                ports = parse_ports_line(line)
                if ports and not ports_seen.is_set():
                    self.grpc_port, self.metrics_port, self.http_port = ports
                    ports_seen.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + ready_timeout
        while not ports_seen.wait(0.2):
            self._check_alive(
                deadline, "before listening", f"did not report its ports within {ready_timeout:.0f} s"
            )

        from fovea.client import Client

        with Client(self.target) as client:
            while True:
                try:
                    if client.health(timeout=2.0) == "SERVING":
                        return self
                except Exception:  # not up yet: keep asking until the deadline
                    pass
                self._check_alive(
                    deadline, "while warming up", f"was not SERVING within {ready_timeout:.0f} s"
                )
                time.sleep(0.3)

    def _check_alive(self, deadline: float, when: str, late: str) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise ServerStartError(f"`fovea serve` exited with code {self.process.returncode} {when}")
        if time.monotonic() > deadline:
            self.kill()
            raise ServerStartError(f"`fovea serve` {late}")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server has used so far (/proc/PID/stat)."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the server drains), then wait; kill and raise TimeoutError if it does not exit."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"the server did not exit within {timeout:.0f} s of SIGTERM") from None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
