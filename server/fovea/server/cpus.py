"""How many CPUs this process may use: its affinity mask, capped by the cgroup's CPU quota.

os.cpu_count() is the node's count: a pod limited to 2 CPUs on a 64-core node would start 64 decode
threads and thrash. Thread pools are sized from this instead.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def affinity() -> int:
    """CPUs this process may be scheduled on (all of them where the OS does not say)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def usable_cpus(cgroup: Path = CGROUP) -> int:
    """min(affinity, ceil(cgroup quota)), at least 1."""
    count = affinity()
    quota = cgroup_quota(cgroup)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def cgroup_quota(cgroup: Path = CGROUP) -> float | None:
    """CPUs the cgroup's quota allows (cgroup v2 cpu.max, else v1 cfs files); None when unlimited."""
    try:
        v2 = cgroup / "cpu.max"
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_file, period_file = cgroup / "cpu" / "cpu.cfs_quota_us", cgroup / "cpu" / "cpu.cfs_period_us"
        if quota_file.exists():
            quota_us = int(quota_file.read_text())
            return None if quota_us <= 0 else quota_us / int(period_file.read_text())
    except (OSError, ValueError):
        return None  # unreadable: fall back to the affinity mask
    return None
