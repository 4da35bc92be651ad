"""CPU time of a process tree, from /proc: a server and everything it started (threads included).

PyTriton runs Triton's C++ server and a Python model process under the Python that started them;
fovea is one process. Counting the whole tree charges each server for all of its work alike.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone meanwhile
        return None
    # The command name is in brackets and may hold spaces: the fields after it are fixed.
    return text.rsplit(")", 1)[1].split()


def tree(pid: int) -> list[int]:
    """`pid` and its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, ()))
    return found


def tree_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by the trees of `pids` (every thread of every process;
    a thread's time is in its process's utime and stime)."""
    total = 0
    for root in pids:
        for pid in tree(root):
            fields = _stat(pid)
            if fields is not None:
                total += int(fields[11]) + int(fields[12])
    return total / _TICK


def threads_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """Per thread of process `pid` alive now: its name (comm) and user + system CPU seconds so far."""
    out = {}
    for entry in os.scandir(f"/proc/{pid}/task"):
        try:
            name = Path(entry.path, "comm").read_text().strip()
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        out[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / _TICK)
    return out
