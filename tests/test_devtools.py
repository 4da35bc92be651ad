"""fovea.devtools: the hint without the extras, the ports line, the /metrics reader, the child environment."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("prometheus_client", reason="fovea.devtools needs the server extra")

from fovea.devtools import prom_text
from fovea.devtools.environment import subprocess_env
from fovea.server.ports_line import format_ports_line, parse_ports_line
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

# Runs `fovea COMMAND --help` in a child where the extras' packages cannot be found, as in a thin install.
_WITHOUT_EXTRAS = (
    "import sys\n"
    "for name in ('tensorflow', 'tf_keras', 'prometheus_client'):\n"
    "    sys.modules[name] = None  # find_spec then answers None, as when it is not installed\n"
    "from fovea.cli import main\n"
    "sys.exit(main([sys.argv[1], '--help']))\n"
)


@pytest.mark.parametrize(
    ("command", "hint"),
    [
        ("serve", "fovea.server needs the server extra: pip install 'fovea[server]'"),
        ("train", "fovea.trainer needs the trainer extra: pip install 'fovea[trainer]'"),
        ("demo", "fovea.devtools needs the server and trainer extras: pip install 'fovea[server,trainer]'"),
    ],
)
def test_command_without_its_extras_fails_with_one_line_hint(command: str, hint: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS, command],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"fovea {command}: error: {hint}"]


def test_ports_line_round_trips_and_rejects_other_lines() -> None:
    line = format_ports_line(40123, 9090, 8080)
    assert parse_ports_line(line) == (40123, 9090, 8080)
    assert parse_ports_line(line).http == 8080
    assert parse_ports_line(line + "\n") == (40123, 9090, 8080)
    assert parse_ports_line("INFO something " + line) == (40123, 9090, 8080)  # a log line ran into it
    assert parse_ports_line(format_ports_line(1, 2, None)) == (1, 2, None)  # --http-port -1
    assert parse_ports_line("fovea serve: grpc_port=1 metrics_port=2") is None
    assert parse_ports_line("grpc_port=1 metrics_port=2 http_port=3 and more") is None


def test_prom_text_reads_what_prometheus_client_writes() -> None:
    registry = CollectorRegistry()
    requests = Counter("fovea_requests", "r", ["method", "code"], registry=registry)
    requests.labels("Predict", "OK").inc(5)
    requests.labels("Predict", "NOT_FOUND").inc(2)
    requests.labels("Health", "OK").inc(7)
    latency = Histogram("lat_seconds", "l", ["method"], buckets=(0.1, 1.0), registry=registry)
    for value in (0.05, 0.05, 0.5, 5.0):
        latency.labels("Predict").observe(value)
    latency.labels("Health").observe(0.05)

    samples = prom_text.parse(generate_latest(registry).decode())

    assert prom_text.total(samples, "fovea_requests_total", method="Predict") == 7
    assert prom_text.total(samples, "fovea_requests_total") == 14
    cumulative = prom_text.buckets(samples, "lat_seconds", method="Predict")
    assert cumulative == [(0.1, 2.0), (1.0, 3.0), (float("inf"), 4.0)]
    assert prom_text.buckets(samples, "lat_seconds") == [(0.1, 3.0), (1.0, 4.0), (float("inf"), 5.0)]
    assert prom_text.per_bucket(cumulative) == [(0.1, 2.0), (1.0, 1.0), (float("inf"), 1.0)]
    assert prom_text.quantile(0.5, cumulative) == pytest.approx(0.1)  # rank 2 of 4 ends bucket 1
    assert prom_text.quantile(0.625, cumulative) == pytest.approx(0.55)  # halfway into (0.1, 1]


def test_subprocess_env_runs_the_code_this_process_runs() -> None:
    import fovea.client
    import fovea.devtools

    code = "import fovea.client, fovea.devtools; print(fovea.client.__file__); print(fovea.devtools.__file__)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd="/",
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [fovea.client.__file__, fovea.devtools.__file__]
