"""Helpers for tests over real processes: `zdni` commands as processes, what workers left in
Redis, the batches a run feeds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import psutil
import redis
import torch
import torch.nn.functional as F
from torch import nn

from zdni import checkpoint, keys
from zdni.config import RunConfig
from zdni.loop import load_data
from zdni.metrics import read_metrics
from zdni.models import build_stages

T = TypeVar("T")


def wait_until(check: Callable[[], T], what: str, timeout: float = 120.0, every: float = 0.05,
               alive: Sequence[subprocess.Popen[Any]] = ()) -> T:
    """Poll `check` until it returns something true, and return that. Fails naming `what`
    after `timeout` s (generous: a deadline on the event, not a measure of its speed), or at
    once when a process in `alive` has exited (what it waited for will not come)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        for proc in alive:
            assert proc.poll() is None, f"waiting for {what}: {proc.args} exited {proc.returncode}"
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(every)


def trained_to(metrics: Path, iteration: int) -> bool:
    """Whether a run's metrics.jsonl records an iteration at or past `iteration` (every one
    is recorded up to 200: zdni.metrics.CLOSE_UP)."""
    return metrics.exists() and any(r.get("kind") == "iter" and r["iteration"] >= iteration
                                    for r in read_metrics(str(metrics)))


def worker_state(client: redis.Redis, run: str, stage: int) -> dict[str, torch.Tensor]:
    """The parameters a worker backed up when it stopped."""
    found = checkpoint.load(client, run, stage)
    assert found is not None, f"stage {stage} left no backup"
    return found[0]


def assert_workers_equal(client: redis.Redis, run: str, stages: list[Any],
                         parts: tuple[str, ...] = ("M",)) -> list[int]:
    """Each worker's backed-up stage (and its `parts`, M and/or I, where it keeps them) equals
    the in-process stage of the same index (zdni.stage.Stage), tensor for tensor; returns how
    many tensors were compared per stage."""
    compared = []
    for stage in stages:
        got = worker_state(client, run, stage.index)
        expected = {f"stage.{k}": v for k, v in stage.module.state_dict().items()}
        for name in parts:
            part = getattr(stage, name)
            if part is not None:
                expected |= {f"{name}.{k}": v for k, v in part.state_dict().items()}
        assert expected.keys() <= got.keys(), (stage.index, sorted(expected.keys() - got.keys()))
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, msg=f"stage {stage.index} {name}")
        compared.append(len(expected))
    return compared


def assert_workers_equal_pytorch(client: redis.Redis, cfg: RunConfig) -> None:
    """The workers' backed-up parameters (and BatchNorm statistics) equal plain single-process
    PyTorch's after the same epoch of backprop with Adam."""
    model = nn.Sequential(*build_stages(cfg))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    for xb, yb in batches(cfg):
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    for s, stage in enumerate(model, start=1):
        got = worker_state(client, cfg.run_id, s)
        for name, value in stage.state_dict().items():
            torch.testing.assert_close(got[f"stage.{name}"], value, msg=f"stage {s} {name}")


def batches(cfg: RunConfig, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An epoch's batches (the first by default), as the run's driver feeds them."""
    data = load_data(cfg)
    feeder = data.train.feeder(cfg.batch_size, cfg.seed, not data.ordered, cfg.data_workers,
                               cfg.drop_last)
    return [(xb, yb) for _, xb, yb in feeder.iter_epoch(epoch)]


class Process:
    """One `zdni` command in its own process, logging to files we can show on failure."""

    def __init__(self, name: str, args: list[str], cwd: Path, env: dict[str, str],
                 prefix: Sequence[str] = ()) -> None:
        self.name = name
        stem = cwd / name.replace(" ", "-")
        self.log_path, self.out_path = stem.with_suffix(".log"), stem.with_suffix(".out")
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._out: IO[bytes] = open(self.out_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "zdni.cli", *args],
                                     cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._log)

    def tail(self, lines: int = 25) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.name} (exit {self.proc.poll()}) ---\n" + "\n".join(text)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go: no test leaves a process behind."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        self._out.close()


def clean_env() -> dict[str, str]:
    """This environment without ZDNI_* settings: each process gets only what its flags say."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZDNI_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    env["ZDNI_THREADS"] = "1"  # five processes share a small box; more threads only contend
    return env


def logs(procs: list[Process]) -> str:
    return "\n".join(p.tail() for p in procs)


def kill_stage_when(client: redis.Redis, run: str, stage: int, iteration: int,
                    record: dict[str, object]) -> None:
    """Watch the stage's heartbeat; once past `iteration`, SIGKILL its worker."""
    def kill() -> bool:
        it = client.hget(keys.heartbeat(run, stage), "iteration")
        if it is None or int(it) < iteration:
            return False
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if "worker" in cmd and run in cmd and cmd[cmd.index("--stage") + 1] == str(stage):
                proc.kill()
                record["killed_at"] = time.time()
                checks = client.hget(keys.counters(run, "broker"), "health_checks")
                record["checks_at_kill"] = int(checks or 0)  # the broker's, done so far
                record["iteration"] = int(it)
                return True
        return False

    wait_until(kill, f"stage {stage} past iteration {iteration}, then killed")


def train_while_killing(cfg: RunConfig, redis_url: str, client: redis.Redis, stage: int,
                        iteration: int) -> tuple[dict[str, Any], dict[str, object]]:
    """Train cfg distributed while a thread SIGKILLs stage's worker past `iteration`; returns
    the summary and what the killer recorded (it did kill)."""
    import threading

    from zdni.cluster import train_distributed

    record: dict[str, object] = {}
    killer = threading.Thread(target=kill_stage_when,
                              args=(client, cfg.run_id, stage, iteration, record), daemon=True)
    killer.start()
    summary = train_distributed(cfg, quiet=True, redis_url=redis_url)
    killer.join(1)
    assert "killed_at" in record, "the worker was never killed"
    return summary, record
