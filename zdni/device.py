"""Where a stage computes: `cpu`, a CPU core set `cpu:A-B` (the worker pins itself there and
takes one torch thread per core), or a GPU `cuda:N`; and pinning a process to cores.

Parsing and choosing are pure (tests/test_device.py); `apply` is the one call that touches the
process (its affinity and torch's thread count).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from zdni.errors import ZdniError

__all__ = ["DeviceError", "DeviceSpec", "apply", "other_cores", "parse", "parse_list", "to_host"]

_CPU_SET = re.compile(r"^cpu:(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)$")


class DeviceError(ZdniError, ValueError):
    """A device spec that cannot be used here; the message says what is allowed."""


@dataclass(frozen=True)
class DeviceSpec:
    """A parsed --device: the torch device to compute on and, for a core set, its cores."""

    text: str
    torch_device: str  # "cpu" or "cuda:N"
    cores: tuple[int, ...] = ()  # pinned cores; empty: the process's current affinity

    @property
    def threads(self) -> int | None:
        """torch threads for this device: one per pinned core, else the caller's default."""
        return len(self.cores) or None


def parse(text: str, available: set[int] | None = None) -> DeviceSpec:
    """`cpu`, `cpu:A-B` / `cpu:A,C-D` or `cuda:N`; a core this process may not run on is an
    error naming the cores it may use."""
    text = text.strip()
    if text == "cpu":
        return DeviceSpec(text, "cpu")
    match = _CPU_SET.match(text)
    if match:
        cores: list[int] = []
        for part in match.group(1).split(","):
            a, _, b = part.partition("-")
            lo, hi = int(a), int(b or a)
            if hi < lo:
                raise DeviceError(f"{text!r}: core range {part} runs backwards")
            cores.extend(range(lo, hi + 1))
        allowed = available if available is not None else _available()
        missing = sorted(set(cores) - allowed)
        if missing:
            raise DeviceError(f"{text!r}: cores {missing} are not among this machine's "
                              f"usable cores {_ranges(sorted(allowed))}")
        return DeviceSpec(text, "cpu", tuple(sorted(set(cores))))
    if re.fullmatch(r"cuda:\d+", text):
        return DeviceSpec(text, text)
    raise DeviceError(f"{text!r}: expected cpu, cpu:A-B (a core set), or cuda:N with CUDA "
                      "available")


def parse_list(text: str, stages: int, available: set[int] | None = None) -> list[DeviceSpec]:
    """--devices: one spec per stage, separated by spaces or semicolons (commas belong to a
    core set: `cpu:0,2;cpu:1,3`)."""
    parts = [p for p in re.split(r"[;\s]+", text.strip()) if p]
    if len(parts) != stages:
        raise DeviceError(f"--devices names {len(parts)} devices for {stages} stages: give one "
                          "per stage, e.g. 'cpu:0 cpu:1 cpu:2' or 'cuda:0;cuda:1'")
    return [parse(p, available) for p in parts]


def other_cores(specs: list[DeviceSpec], available: set[int] | None = None) -> tuple[int, ...]:
    """The usable cores no stage is pinned to (where the broker, driver and Redis should run),
    or all of them when the stages take every core."""
    allowed = available if available is not None else set(os.sched_getaffinity(0))
    taken = {c for s in specs for c in s.cores}
    rest = sorted(allowed - taken)
    return tuple(rest or sorted(allowed))


def apply(spec: DeviceSpec) -> None:
    """Pin this process to the spec's cores and give torch one thread per core."""
    if spec.cores:
        try:
            os.sched_setaffinity(0, spec.cores)
        except OSError as exc:
            raise DeviceError(f"{spec.text!r}: cannot run on cores {list(spec.cores)} "
                              f"({exc.strerror})") from None
        import torch

        torch.set_num_threads(len(spec.cores))


def to_host(tensors: dict[str, Any]) -> dict[str, Any]:
    """`tensors` with every CUDA tensor copied into pinned host memory: all copies are started
    without blocking and waited for once, so a stage's activation and gradient travel to the
    host together. CPU tensors pass through untouched. Pinned blocks come from torch's caching
    host allocator and return to it when the sent frames release them (zdni.transport sends
    without copying)."""
    import torch

    out: dict[str, Any] = {}
    pending = None
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t.detach(), non_blocking=True)
            out[name] = host
            pending = t.device
        else:
            out[name] = t
    if pending is not None:
        torch.cuda.current_stream(pending).synchronize()
    return out


def _available() -> set[int]:
    """The machine's cores: a process may pin itself outside its parent's narrower affinity
    (zdni train keeps itself off the stages' cores, and its workers pin themselves there)."""
    return set(range(os.cpu_count() or 1)) | set(os.sched_getaffinity(0))


def _ranges(cores: list[int]) -> str:
    out, start = [], None
    for i, c in enumerate(cores):
        if start is None:
            start = c
        if i + 1 == len(cores) or cores[i + 1] != c + 1:
            out.append(f"{start}-{c}" if c != start else f"{c}")
            start = None
    return ",".join(out)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread while the driver feeds the stages, then as before.

    The driver's torch work is gathering batches (and summing evaluation results): with the
    default of one thread per core its OpenMP team takes cores the stage workers need. Measured
    (docs/BENCHMARKS.md section 9): dgl on the wide FCN, 2 stages on 2 pinned cores, 6,361 and
    6,401 samples/s with the driver at torch's default, 7,622 and 8,109 with one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
