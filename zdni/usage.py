"""What a worker's heartbeat says about its machine: CPU, memory, disk and, on a GPU, NVML's figures.

The seed's workers reported CPU, disk and GPU utilization (GPU through NVIDIA's tools); here GPU
figures come from NVML through NVIDIA's own bindings (`nvidia-ml-py`, module `pynvml`), not from
parsing nvidia-smi. A figure that cannot be had is absent from the result, never 0: a CPU stage
has no GPU fields at all, and a GPU whose NVML is missing has only torch's own memory count.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

__all__ = ["disk", "gpu", "utilization"]

log = logging.getLogger("zdni.usage")

_process: Any = None
_nvml: Any = None  # the pynvml module once nvmlInit succeeded; False once it failed
_handles: dict[str, Any] = {}


def utilization(device: str, disk_path: str | None = None) -> dict[str, float | str]:
    """CPU % and resident memory of this process, the disk of `disk_path` (default: the working
    directory), and on ``cuda:N`` the GPU's figures (see `gpu`)."""
    global _process
    import psutil

    if _process is None:
        _process = psutil.Process()
        _process.cpu_percent(None)  # the first reading is meaningless; it starts the clock
    out: dict[str, float | str] = {"cpu_percent": _process.cpu_percent(None),
                                   "rss_mb": _process.memory_info().rss / 2**20}
    out.update(disk(disk_path or os.getcwd()))
    if device.startswith("cuda"):
        out.update(gpu(device))
    return out


def disk(path: str) -> dict[str, float | str]:
    """Usage of the filesystem holding `path` (GiB, and % used as df counts it); {} when it
    cannot be read.

    A path that does not exist yet (a checkpoint directory made at the first backup) is measured
    at its nearest existing parent.
    """
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        total, used, free = shutil.disk_usage(probe)
    except OSError:
        return {}
    return {"disk_path": probe, "disk_total_gb": round(total / 2**30, 2),
            "disk_free_gb": round(free / 2**30, 2),
            # as df's Use%: of the space a user may fill (root's reserve left out)
            "disk_used_percent": round(100.0 * used / (used + free), 1) if used + free else 0.0}


def gpu(device: str) -> dict[str, float | str]:
    """The GPU of `device` (``cuda:N``, N as torch counts): memory this process allocated
    (torch, MiB) and, through NVML, the whole GPU's utilization (% of the last sample period)
    and memory used/total (MiB). NVML's figures are absent when NVML cannot be loaded."""
    import torch

    out: dict[str, float | str] = {"gpu_mem_mb": torch.cuda.memory_allocated(device) / 2**20}
    handle = _handle(device)
    if handle is None:
        return out
    try:
        rates = _nvml.nvmlDeviceGetUtilizationRates(handle)
        memory = _nvml.nvmlDeviceGetMemoryInfo(handle)
    except _nvml.NVMLError as exc:
        log.debug("NVML reading of %s failed: %s", device, exc)
        return out
    out.update({"gpu_util_percent": float(rates.gpu), "gpu_mem_used_mb": memory.used / 2**20,
                "gpu_mem_total_mb": memory.total / 2**20,
                "gpu_name": _name(handle)})
    return out


def _handle(device: str) -> Any:
    """NVML's handle of torch's `device`, matched by UUID (torch and NVML may number GPUs
    differently under CUDA_VISIBLE_DEVICES); None without NVML."""
    global _nvml
    if device in _handles:
        return _handles[device]
    if _nvml is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception as exc:  # no NVIDIA driver library, or no bindings installed
            log.info("no NVML (%s): heartbeats carry torch's GPU memory only", exc)
            _nvml = False
    if _nvml is False:
        return None
    import torch

    try:
        uuid = str(torch.cuda.get_device_properties(torch.device(device)).uuid)
        handle = _nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception as exc:
        log.info("NVML does not know %s (%s)", device, exc)
        handle = None
    _handles[device] = handle
    return handle


def _name(handle: Any) -> str:
    name = _nvml.nvmlDeviceGetName(handle)
    return name.decode() if isinstance(name, bytes) else str(name)
