"""CPU seconds of every process and thread of a run, from /proc, over a window of iterations.

scripts/bench_overhead.py's accounting: the driver (this process) and its descendants (broker,
workers, redis-server, a relay chain's processes), each split into its main thread, ZeroMQ's
I/O threads and the rest, and what reached Redis in the same window.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")

def _ticks(path: str) -> tuple[str, float]:
    """(comm, user + system seconds) of /proc/PID[/task/TID]/stat."""
    with open(path) as fh:
        raw = fh.read()
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return comm, (int(fields[11]) + int(fields[12])) / TICK


def _role(pid: int) -> str:
    if pid == os.getpid():
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return "?"
    text = " ".join(argv)
    if "redis-server" in text:
        return "redis"
    if "--relay-role" in argv:
        return argv[argv.index("--relay-role") + 1]
    if " broker" in text:
        return "broker"
    if " worker" in text and "--stage" in argv:
        return f"stage {argv[argv.index('--stage') + 1]}"
    return os.path.basename(argv[0]) if argv else "?"


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):  # it ended while we walked: no children to add
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo.extend(int(c) for c in fh.read().split())
    return out


def _kernel(pid: int) -> dict[str, float]:
    """The whole process's system CPU seconds and minor page faults so far (/proc/PID/stat):
    copies through sockets and first touches of fresh memory show there."""
    with open(f"/proc/{pid}/stat") as fh:
        raw = fh.read()
    fields = raw[raw.rindex(")") + 2 :].split()
    return {"sys_s": int(fields[12]) / TICK, "minflt": float(fields[7])}


def snapshot() -> dict[int, tuple[str, dict[str, float], dict[str, float]]]:
    """{pid: (role, {thread: CPU s}, _kernel(pid))} of this process and its descendants; a
    thread is 'main', 'zmq' (ZeroMQ's I/O threads) or 'other'."""
    out: dict[int, tuple[str, dict[str, float], dict[str, float]]] = {}
    for pid in _descendants(os.getpid()):
        threads: dict[str, float] = defaultdict(float)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                comm, secs = _ticks(f"/proc/{pid}/task/{tid}/stat")
                kind = "main" if int(tid) == pid else "zmq" if comm.startswith("ZMQbg") \
                    else "other"
                threads[kind] += secs
            kernel = _kernel(pid)
        except (OSError, ValueError):
            continue
        out[pid] = (_role(pid), dict(threads), kernel)
    return out


def kernel_spent(before: dict[int, Any], after: dict[int, Any]) -> dict[str, dict[str, float]]:
    """System CPU seconds and minor faults by role between two snapshots (pids alive at both)."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for pid, (role, _, kernel) in after.items():
        if pid in before:
            for name, value in kernel.items():
                out[role][name] += value - before[pid][2][name]
    return {r: dict(k) for r, k in out.items()}


def spent(before: dict[int, Any], after: dict[int, Any]) -> dict[str, dict[str, float]]:
    """CPU seconds by role and thread kind between two snapshots (pids alive at both)."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for pid, (role, threads, _) in after.items():
        if pid not in before:
            continue
        for kind, secs in threads.items():
            out[role][kind] += secs - before[pid][1].get(kind, 0.0)
    return {r: dict(k) for r, k in out.items()}


class Window:
    """CPU and wall clock from iteration `warmup` to `warmup + iters`, both drained."""

    def __init__(self, warmup: int, iters: int) -> None:
        self.warmup, self.iters = warmup, iters
        self.redis0: dict[str, int] = {}
        self.start: tuple[float, dict[int, Any]] | None = None
        self.result: dict[str, Any] | None = None

    def hook(self, cls: Any) -> None:
        """Wrap a runner class's feed: the window opens before iteration `warmup` is fed and
        closes once iteration `warmup + iters - 1` is finished."""
        feed, window = cls.feed, self

        def timed_feed(runner: Any, x: Any, y: Any) -> int:
            client = getattr(runner, "redis", None)  # the driver's; none in process
            if window.start is None and runner.fed == window.warmup:
                runner.drain()
                window.start = (time.monotonic(), snapshot())
                window.redis0 = redis_stats(client)
            fed = feed(runner, x, y)
            if window.start is not None and window.result is None and \
                    runner.fed == window.warmup + window.iters:
                runner.drain()
                t0, snap0 = window.start
                snap1 = snapshot()
                window.result = {"iters": window.iters, "wall_s": time.monotonic() - t0,
                                 "cpu": spent(snap0, snap1),
                                 "kernel": kernel_spent(snap0, snap1)}
                if client is not None:
                    after = redis_stats(client)
                    window.result["redis"] = {k: after[k] - window.redis0[k] for k in after}
                    window.result["slots"] = slot_sizes(client, runner.cfg.run_id)
            return fed  # type: ignore[no-any-return]

        cls.feed = timed_feed


def redis_stats(client: Any) -> dict[str, int]:
    """Redis's counters so far: SET calls and their microseconds inside Redis, bytes in."""
    if client is None:
        return {}
    cmd = client.info("commandstats").get("cmdstat_set", {})
    return {"set_calls": int(cmd.get("calls", 0)), "set_usec": int(cmd.get("usec", 0)),
            "in_bytes": int(client.info("stats")["total_net_input_bytes"])}


def slot_sizes(client: Any, run: str) -> dict[str, dict[str, int]]:
    """{'stage/ring': {'keys': n, 'bytes': size of one slot}} of the run's rings in Redis."""
    from zdni import keys

    out: dict[str, dict[str, int]] = {}
    for name in client.scan_iter(keys.slot_pattern(run)):
        stage, ring = keys.text(name).split(":")[-3:-1]
        entry = out.setdefault(f"{stage}/{ring}", {"keys": 0, "bytes": 0})
        entry["keys"] += 1
        entry["bytes"] = max(entry["bytes"], int(client.strlen(name)))
    return dict(sorted(out.items()))
