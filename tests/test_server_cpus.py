"""Pools are sized from the CPUs the process may use, not the node's count."""

from __future__ import annotations

import os

from fovea.server import cpus


def test_cgroup_v2_quota_caps_the_count(tmp_path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpus.cgroup_quota(tmp_path) == 1.5
    assert cpus.usable_cpus(tmp_path) == min(len(os.sched_getaffinity(0)), 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus.cgroup_quota(tmp_path) is None
    assert cpus.usable_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_cgroup_v1_quota_and_a_tiny_quota(tmp_path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.cgroup_quota(tmp_path) == 0.5
    assert cpus.usable_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.cgroup_quota(tmp_path) is None


def test_no_cgroup_files_means_the_affinity_mask(tmp_path) -> None:
    assert cpus.usable_cpus(tmp_path) == len(os.sched_getaffinity(0))
