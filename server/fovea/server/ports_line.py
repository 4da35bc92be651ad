"""The one stdout line `fovea serve` prints once its ports are bound, and its parser.

Whoever starts `fovea serve --port 0` (the demo, the benchmarks, tests, scripts) learns the ports the
OS chose from this line. The format and the parser live together so they cannot drift apart. This
module imports nothing heavy: reading the line must not load TensorFlow.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# search, not match: on a terminal shared with stderr a log line may run into it.
_PORTS = re.compile(r"fovea serve: grpc_port=(\d+) metrics_port=(\d+) http_port=(\d+|None)\s*$")


class Ports(NamedTuple):
    grpc: int
    metrics: int
    http: int | None  # None when the REST port is off (--http-port -1)


def format_ports_line(grpc_port: int, metrics_port: int, http_port: int | None) -> str:
    return f"fovea serve: grpc_port={grpc_port} metrics_port={metrics_port} http_port={http_port}"


def parse_ports_line(line: str) -> Ports | None:
    """The ports when `line` is the ports line, else None."""
    match = _PORTS.search(line)
    if not match:
        return None
    grpc, metrics, http = match.groups()
    return Ports(int(grpc), int(metrics), None if http == "None" else int(http))
