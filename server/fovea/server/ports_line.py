"""The one stdout line `fovea serve` prints once its ports are bound, and its parser.

Whoever starts `fovea serve --port 0` (the demo, the benchmarks, tests, scripts) learns the ports the
OS chose from this line. The format and the parser live together so they cannot drift apart. This
module imports nothing heavy: reading the line must not load TensorFlow.
"""

from __future__ import annotations

import re

# search, not match: on a terminal shared with stderr a log line may run into it.
_PORTS = re.compile(r"fovea serve: grpc_port=(\d+) metrics_port=(\d+)\s*$")


def format_ports_line(grpc_port: int, metrics_port: int) -> str:
    return f"fovea serve: grpc_port={grpc_port} metrics_port={metrics_port}"


def parse_ports_line(line: str) -> tuple[int, int] | None:
    """(grpc_port, metrics_port) when `line` is the ports line, else None."""
    match = _PORTS.search(line)
    return (int(match.group(1)), int(match.group(2))) if match else None
