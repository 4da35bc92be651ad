"""/metrics: promtool-clean exposition, and a real Prometheus scrape that counts what was sent."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the server tests need the server extra")

from _models import export_tiny
from _serving import client, start_server, stop_server, wait_until
from fovea.client import FoveaError

SENT_OK = 17
SENT_BAD = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    export_tiny(models, "tiny", 16)
    srv = start_server(models, max_batch_size=4, allowed_batch_sizes=(2, 4))
    wait_until(lambda: srv.manager.ready, what="ready")
    image = np.zeros((16, 16, 3), np.uint8)
    with client(srv.port, max_images_per_request=8) as fovea:
        for _ in range(SENT_OK):
            fovea.predict(image, timeout=10)
        for _ in range(SENT_BAD):
            with pytest.raises(FoveaError, match="INVALID_ARGUMENT"):
                fovea.predict(image, top_k=99, timeout=10)
    yield srv
    stop_server(srv)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_metrics_names_and_values(server) -> None:
    text = scrape(server.metrics_port)
    assert f'fovea_requests_total{{code="OK",method="Predict",protocol="fovea.v1"}} {float(SENT_OK)}' in text
    assert (
        f'fovea_requests_total{{code="INVALID_ARGUMENT",method="Predict",protocol="fovea.v1"}} {float(SENT_BAD)}'
        in text
    )
    assert f'fovea_images_inferred_total{{model="tiny"}} {float(SENT_OK)}' in text
    assert 'fovea_model_version_info{model="tiny",version="1"} 1.0' in text
    assert 'fovea_batch_padding_images_sum{model="tiny"} 17.0' in text  # each lone image padded to 2
    for name in (
        "fovea_request_duration_seconds_bucket",
        "fovea_queue_duration_seconds_bucket",
        "fovea_compute_duration_seconds_bucket",
        "fovea_batch_size_images_bucket",
        "fovea_model_load_duration_seconds_bucket",
        "fovea_model_warmup_duration_seconds_bucket",
        "fovea_queue_depth_requests",
        "fovea_shed_requests_total",
        "fovea_expired_requests_total",
        "fovea_model_loads_total",
        "fovea_model_load_failures_total",
        "fovea_batches_total",
    ):
        assert name in text, name
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    # Ours, and the process collector's (RSS, CPU, open files) for the dashboard.
    assert all(n.startswith(("fovea_", "process_")) for n in names), names
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= names, names
    assert "_created" not in text  # prometheus_client's creation timestamps are turned off


def test_promtool_check_metrics_is_clean(server) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run does it)")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=scrape(server.metrics_port),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


def _free_port() -> int:
    # Prometheus cannot report a port it picked itself, so this one is chosen here (retried on a clash).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_prometheus_scrapes_the_request_count(server, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus; .ci/run does it)")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: fovea\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.metrics_port}']\n"
    )
    query = 'sum(fovea_requests_total{job="fovea",method="Predict",code="OK"})'
    for _attempt in range(3):
        port = _free_port()
        log = (tmp_path / f"prometheus-{port}.log").open("w")
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / f'data-{port}'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:

            def value(proc=proc, port=port) -> float | None:
                if proc.poll() is not None:
                    return -1.0
                url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        body = json.load(response)
                except OSError:
                    return None
                result = body["data"]["result"]
                return float(result[0]["value"][1]) if result else None

            got = wait_until(value, timeout=60, interval=0.5, what="Prometheus to scrape the server")
            if got == -1.0:  # the port was taken between choosing and binding: try another
                time.sleep(0.2)
                continue
            assert got == SENT_OK
            return
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log.close()
    pytest.fail(
        "prometheus did not start on three ports: " + "".join(p.read_text() for p in tmp_path.glob("*.log"))
    )
