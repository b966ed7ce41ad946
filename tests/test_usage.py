"""Tests of zdni.usage: the disk and GPU figures a heartbeat carries, absent (not zero) where
there is nothing to measure."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil
import pytest
import redis
import torch

from zdni import keys
from zdni.health import beat
from zdni.usage import disk, utilization


def test_disk_is_the_filesystem_of_the_path(tmp_path: Path) -> None:
    """disk() reports the path's filesystem as shutil sees it; a directory not made yet is
    measured at its nearest existing parent."""
    total, used, free = shutil.disk_usage(tmp_path)
    got = disk(str(tmp_path / "not" / "made" / "yet"))
    assert got["disk_path"] == str(tmp_path)
    assert got["disk_total_gb"] == round(total / 2**30, 2)
    assert abs(float(got["disk_used_percent"]) - 100 * used / (used + free)) < 1.0  # df's Use%


def test_a_cpu_stage_has_no_gpu_fields(tmp_path: Path) -> None:
    """On a CPU device the GPU figures are absent, never reported as 0."""
    got = utilization("cpu", str(tmp_path))
    assert not [k for k in got if k.startswith("gpu")]
    assert abs(float(got["rss_mb"]) - psutil.Process().memory_info().rss / 2**20) < 64
    assert "disk_free_gb" in got


def test_heartbeat_carries_the_checkpoint_disk(redis_client: redis.Redis, tmp_path: Path) -> None:
    """A worker's beat names the filesystem of its checkpoint directory and its usage."""
    beat(redis_client, "u", 1, "alive", 3, {}, "cpu", 1.0, disk_path=str(tmp_path))
    hb = {keys.text(k): keys.text(v) for k, v in
          redis_client.hgetall(keys.heartbeat("u", 1)).items()}
    assert hb["disk_path"] == str(tmp_path)
    assert 0.0 < float(hb["disk_used_percent"]) <= 100.0
    assert float(hb["disk_free_gb"]) <= float(hb["disk_total_gb"])
    assert "gpu_util_percent" not in hb and "gpu_mem_mb" not in hb


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_stage_reports_nvml_figures() -> None:
    """On cuda:0 the beat has NVML's utilization and memory of that GPU, and torch's own count."""
    x = torch.ones(1024, 1024, device="cuda:0")  # 4 MiB held by this process
    got = utilization("cuda:0", os.getcwd())
    assert float(got["gpu_mem_mb"]) >= 4.0
    assert 0.0 <= float(got["gpu_util_percent"]) <= 100.0
    assert 0.0 < float(got["gpu_mem_used_mb"]) <= float(got["gpu_mem_total_mb"])
    assert got["gpu_name"]
    del x
