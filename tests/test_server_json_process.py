"""Large REST JSON bodies parse in a child process (json_process.py), off the server's GIL.

Without a server: the child gives what v2_json.parse gives, errors and all; a child killed
mid-parse costs that request UNAVAILABLE and the next one gets a new child; close() leaves none.
Against a real `fovea serve`: the worst bodies of the REST issue (300,000 repeated outputs, a 16 MiB
UINT8 JSON tensor) each get their 400 while gRPC health is polled (the max latency is printed; the
bound asserted is generous, since the machine may be loaded), a killed parse process gives a
counted 503 and the next request is served, and the parse process exits with the server.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tensorflow", reason="fovea.server needs the server extra")

from fovea.server import errors, json_process, v2_json

SMALL = 1024  # JsonParser's threshold in the unit tests: anything larger goes to the child


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def uint8_body(n: int, shape: list[int] | None = None) -> bytes:
    tensor = {"name": "images", "datatype": "UINT8", "shape": shape or [1, 32, 32, 3], "data": [7] * n}
    return json.dumps({"inputs": [tensor]}).encode()


def run_and_kill(pid: int, work: Callable[[], Any]) -> Any:
    """`work()` on a thread, its parse process `pid` SIGKILLed once it spent 0.2 s of CPU on the parse;
    what work returned or raised. Skips when the parse finished first (nothing to check then)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    start = cpu_ticks(pid)
    thread.start()
    killed = False
    while thread.is_alive() and not killed:
        if cpu_ticks(pid) - start >= 20:
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.01)
    thread.join(120)
    assert not thread.is_alive(), "the request hung after its parse process died"
    if not killed:
        pytest.skip("the parse finished before its process could be killed (nothing to check)")
    return outcome[0]


def test_the_child_parses_as_the_thread_does() -> None:
    parser = json_process.JsonParser(small=SMALL)
    bodies = [
        uint8_body(5000),
        json.dumps(
            {
                "id": "x" * 2000,
                "parameters": {"binary_data_output": True},
                "inputs": [
                    {
                        "name": "image_bytes",
                        "datatype": "BYTES",
                        "shape": [3],
                        "data": ["a", "\u00e9", "\ud800"],
                    }
                ],
            }
        ).encode(),
        json.dumps(
            {"inputs": [{"name": "f", "datatype": "FP32", "shape": [2000], "data": [1.5] * 2000}]}
        ).encode(),
        json.dumps(
            {"outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}] * 500}
        ).encode(),
    ]
    try:
        for body in bodies:
            assert len(body) >= SMALL
            here, there = v2_json.parse(body, 0), parser.parse(body, 0)
            for a, b in zip(here.inputs, there.inputs, strict=True):
                assert (a.name, a.datatype, a.shape, a.raw) == (b.name, b.datatype, b.shape, b.raw)
                assert (a.values is None) == (b.values is None)
                if a.values is not None:
                    assert list(a.values) == list(b.values)
            assert (here.outputs, here.binary_names, here.binary_output, here.id, here.parameters) == (
                there.outputs,
                there.binary_names,
                there.binary_output,
                there.id,
                there.parameters,
            )
        assert parser.parse(bodies[3], 0).outputs == [("probabilities", 0, 500)]
        bad = [b"[" * 5000, uint8_body(5000)[:-3], json.dumps({"inputs": [{"shape": "x" * 2000}]}).encode()]
        for body in bad:
            with pytest.raises(errors.InvalidArgument) as here:
                v2_json.parse(body, 0)
            with pytest.raises(errors.InvalidArgument) as there:
                parser.parse(body, 0)
            assert str(here.value) == str(there.value)
    finally:
        parser.close()


def test_a_killed_child_fails_its_request_and_is_replaced() -> None:
    parser = json_process.JsonParser(small=SMALL)
    try:
        parser.parse(uint8_body(SMALL), 0)  # the child is up
        pid = parser.pid()
        assert pid is not None
        big = uint8_body(3_000_000, shape=[1])
        outcome = run_and_kill(pid, lambda: parser.parse(big, 0))
        assert isinstance(outcome, json_process.ParseProcessFailed), outcome
        assert outcome.code == "UNAVAILABLE"
        assert parser.parse(uint8_body(SMALL), 0).inputs[0].raw == bytes([7]) * SMALL
        assert parser.restarts == 1 and parser.pid() not in (None, pid)
    finally:
        parser.close()
    assert parser.pid() is None
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


# -- against a real server --------------------------------------------------------------------------


def parse_children(pid: int) -> list[int]:
    """The server's parse processes (its children running fovea.server.json_process)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"fovea.server.json_process" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_server_fuzz import start_fuzz_server

    # 64 MiB messages, so 16 MiB of JSON is parsed (a quarter of the message limit).
    process = start_fuzz_server(tmp_path_factory, "--max-message-mb", "64")
    yield process
    process.stop()


def test_the_worst_json_bodies_are_refused_while_health_answers(server) -> None:
    from _serving import wait_until
    from fovea.devtools import hostile_http as hostile
    from test_server_fuzz import SIZE

    images = {
        "name": "images",
        "datatype": "UINT8",
        "shape": [32, SIZE, SIZE, 3],
        "data": [0] * (32 * SIZE * SIZE * 3),
    }
    cases = {
        "32 images + 300,000 repeated outputs": (
            json.dumps({"inputs": [images], "outputs": [{"name": "probabilities"}] * 300_000}).encode(),
            b"300000 outputs requested",
        ),
        "16 MiB UINT8 JSON tensor": (uint8_body(16 * 2**20 // 3 - 64), b"bytes of data; its shape needs"),
    }
    stop = threading.Event()
    latencies = hostile.health_latencies(server.target, stop)
    wait_until(lambda: len(latencies) >= 3, timeout=30, what="health polled")
    worst, answers = {}, {}
    try:
        for kind, (data, _) in cases.items():
            mark = len(latencies)
            answers[kind] = hostile.post(server.http_port, "/v2/models/tiny/infer", data)
            time.sleep(0.3)  # the check in flight when the answer came
            worst[kind] = max(latencies[mark:], default=0.0)
    finally:
        stop.set()
    for kind, seconds in worst.items():
        print(f"\n{kind}: HTTP {answers[kind][0]}; max gRPC health latency meanwhile {seconds * 1000:.0f} ms")
    for kind, (_, expected) in cases.items():
        status, answer = answers[kind]
        assert status == 400 and expected in answer, (kind, answer[:200])
    assert parse_children(server.process.pid), "the large bodies did not go to the parse process"
    # Before the parse process these stalled health 0.7-1.7 s on this machine; loaded, a few hundred ms
    # of scheduling noise remain possible, so only a generous bound.
    assert max(worst.values()) < 1.0, worst


def test_a_killed_parse_process_gives_a_counted_503(server) -> None:
    from fovea.devtools import hostile_http as hostile
    from test_server_fuzz import metric_counts

    hostile.post(server.http_port, "/v2/models/tiny/infer", uint8_body(100_000))  # the child is up
    (pid,) = parse_children(server.process.pid)
    before = metric_counts(server.metrics_url)[("ModelInfer", "UNAVAILABLE")]
    big = uint8_body(3_000_000, shape=[1])
    status, body = run_and_kill(pid, lambda: hostile.post(server.http_port, "/v2/models/tiny/infer", big))
    assert status == 503 and b"JSON parser process stopped" in body, body[:200]
    assert metric_counts(server.metrics_url)[("ModelInfer", "UNAVAILABLE")] == before + 1
    status, body = hostile.post(server.http_port, "/v2/models/tiny/infer", uint8_body(100_000))
    assert status == 400 and b"its shape needs" in body, body[:200]
    assert parse_children(server.process.pid) not in ([], [pid])


def test_the_parse_process_exits_with_the_server(tmp_path_factory) -> None:
    from fovea.devtools import hostile_http as hostile
    from test_server_fuzz import start_fuzz_server

    process = start_fuzz_server(tmp_path_factory)
    try:
        hostile.post(process.http_port, "/v2/models/tiny/infer", uint8_body(100_000))
        children = parse_children(process.process.pid)  # 300 KB of JSON: past SMALL_JSON, within 1 MiB
        assert len(children) == 1, children
    finally:
        process.kill()  # SIGKILL: no stop() runs, the child must notice on its own
    (child,) = children
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists(), "the parse process outlived the server"
