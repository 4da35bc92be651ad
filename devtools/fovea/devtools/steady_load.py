"""Steady closed-loop traffic and a health poller against a running server, counting what failed.

Fault probes (bench/storage_blip.py) and the tests that inject the same faults (tests/test_server_model_dir.py)
run it around the fault: each caller sends the next request as soon as the last returned, through the
real client without retries, so any request the fault drops is counted; the poller asks grpc.health.v1
every `health_every_s` and counts every answer that is not SERVING.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fovea.client import Client, FoveaError, RetryPolicy


@dataclass
class LoadCounts:
    ok: int = 0
    failed: Counter = field(default_factory=Counter)  # status code name -> requests
    health: Counter = field(default_factory=Counter)  # health status -> answers
    first_errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "requests_ok": self.ok,
            "requests_failed": sum(self.failed.values()),
            "failed_by_code": dict(self.failed),
            "health_answers": dict(self.health),
            "first_errors": self.first_errors,
        }


class SteadyLoad:
    """`with SteadyLoad(target, image_size):` runs the traffic until the block ends."""

    def __init__(
        self,
        target: str,
        image_size: int,
        callers: int = 2,
        health_every_s: float = 0.05,
        timeout: float = 30.0,
    ) -> None:
        self._target = target
        self._callers = callers
        self._health_every_s = health_every_s
        self._timeout = timeout
        self._image = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.counts = LoadCounts()

    def _client(self) -> Client:
        return Client(self._target, retry_policy=RetryPolicy(max_attempts=1))

    def _call(self) -> None:
        with self._client() as c:
            while not self._stop.is_set():
                try:
                    c.predict(self._image, timeout=self._timeout)
                except FoveaError as exc:
                    with self._lock:
                        self.counts.failed[exc.code.name] += 1
                        if len(self.counts.first_errors) < 5:
                            self.counts.first_errors.append(str(exc)[:300])
                    time.sleep(0.01)  # a failing server answers at once; do not spin
                    continue
                with self._lock:
                    self.counts.ok += 1

    def _poll_health(self) -> None:
        with self._client() as c:
            while not self._stop.wait(self._health_every_s):
                try:
                    status = c.health(timeout=5)
                except FoveaError as exc:
                    status = exc.code.name
                with self._lock:
                    self.counts.health[status] += 1

    def __enter__(self) -> SteadyLoad:
        self._threads = [threading.Thread(target=self._call, daemon=True) for _ in range(self._callers)]
        self._threads.append(threading.Thread(target=self._poll_health, daemon=True))
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self._timeout + 10)
