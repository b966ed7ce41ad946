"""Running a distributed training: a local cluster (`zdni train`) or processes elsewhere (`zdni run`).

Both read the data first (a bad data directory is an error before any process starts), publish
the run, drive it with zdni.driver.Driver and record in Redis whether it finished or failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

from zdni import keys, methods, rundir
from zdni.config import ConfigError, RunConfig, new_run_id
from zdni.device import DeviceSpec, other_cores, parse_list
from zdni.driver import Driver, StopRequested
from zdni.launcher import Cluster
from zdni.loop import Data, load_data
from zdni.metrics import MetricsWriter
from zdni.models import stage_count
from zdni.outage import RedisGone
from zdni.plan import plan
from zdni.redisserver import EmbeddedRedis, connect, mask_url
from zdni.resume import Checkpoint, Checkpointer, clear_run, seed
from zdni.security import Curve
from zdni.transport import local_address
from zdni.usercode import is_reference

__all__ = ["run_remote", "train_distributed"]

log = logging.getLogger("zdni.driver")


@contextlib.contextmanager
def marking_outcome(driver: Driver) -> Iterator[None]:
    """Record in Redis whether the block finished the run, failed it, or an operator stopped it."""
    try:
        yield
    except StopRequested:
        with contextlib.suppress(Exception):
            driver.set_outcome("stopped")
        raise
    except BaseException as exc:
        with contextlib.suppress(Exception):  # Redis itself gone for good: no wait for it
            driver.set_outcome("failed", wait_s=0 if isinstance(exc, RedisGone) else 30.0)
        raise
    driver.set_outcome("finished")


@contextlib.contextmanager
def local_redis(url: str | None, persist_dir: str | None = None
                ) -> Iterator[tuple[str, EmbeddedRedis | None]]:
    """The given Redis URL, or an embedded server for the duration of the block (persisting
    to an append-only file in `persist_dir`, so that it can be restarted with what it held)."""
    if url:
        yield url, None
        return
    with EmbeddedRedis(persist_dir=persist_dir) as server:
        yield server.local_url, server  # every process of a local run is on this host


def write_run_file(run_dir: str | None, **fields: Any) -> None:
    """RUN_DIR/run.json: where the run's Redis and broker are, for `--run-dir` and operators
    (a password in the Redis URL is written as ***: give --redis-url then)."""
    if not run_dir:
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "run.json"), "w") as fh:
        json.dump(fields, fh, indent=2)


def read_run_file(run_dir: str) -> dict[str, Any]:
    """What RUN_DIR/run.json says (run id, Redis URL, broker), or a ConfigError naming it."""
    path = os.path.join(run_dir, "run.json")
    try:
        with open(path) as fh:
            found = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a zdni run directory's run.json ({exc})") from None
    if not isinstance(found, dict) or not {"run_id", "redis_url"} <= set(found):
        raise ConfigError(f"{path}: expected run_id and redis_url")
    return found


def run_remote(cfg: RunConfig, broker: str, redis_url: str, quiet: bool = False,
               download: bool = False, ready_s: float = 600.0, out_dir: str | None = None,
               curve: Curve | None = None, tensorboard: str | None = None,
               resume: Checkpoint | None = None) -> dict[str, Any]:
    """`zdni run`: drive workers and a broker started elsewhere (other hosts, honcho)."""
    cfg.run_id = cfg.run_id or new_run_id(cfg)
    data = load_data(cfg, download)
    chosen = plan(cfg, data, resumed=resume is not None)
    client = connect(redis_url, fail_fast=True)
    try:
        with rundir.closing(out_dir, cfg, data.norm, resumed=resume is not None):
            start_clean(client, cfg.run_id, resume)
            metrics = MetricsWriter(cfg, stage_count(cfg), out_dir, client,
                                    tensorboard=tensorboard, append=resume is not None)
            try:
                driver = Driver(cfg, client, broker, metrics, curve=curve, ready_s=ready_s)
                driver.publish()
                write_run_file(out_dir, run_id=cfg.run_id, redis_url=mask_url(redis_url),
                               broker=broker, out_dir=out_dir)
                log.warning("[driver] run %s published; waiting for %d stage workers",
                            cfg.run_id, driver.stages)
                with marking_outcome(driver):
                    summary = _train(driver, data, quiet, cfg, out_dir, resume)
                    summary["counts"] = driver.counts()
                return _with_balance(summary, chosen)
            finally:
                metrics.close()
    finally:
        client.close()


def start_clean(client: Any, run: str, resume: Checkpoint | None) -> None:
    """Before a run is published: a new run may not take the id of one Redis holds (a worker
    would resume that one's backups); a resumed run clears its earlier attempt's keys and puts
    its checkpoint where its workers resume from."""
    if resume is None:
        if client.exists(keys.config(run)):
            raise rundir.RunIdTaken(f"run {run} already exists in this Redis: continue it "
                                    "with `zdni train --resume RUN_DIR`, or give another "
                                    "--run-id")
        return
    clear_run(client, run)
    seed(client, run, resume)


def _train(driver: Driver, data: Data, quiet: bool, cfg: RunConfig, out_dir: str | None,
           resume: Checkpoint | None) -> dict[str, Any]:
    """driver.train from the checkpoint when resuming, checkpointing into out_dir (only where
    there is a run directory to keep them)."""
    saver = Checkpointer(out_dir, cfg, resume) if out_dir else None
    start = resume.loop if resume else None
    summary = driver.train(data, quiet, start, saver)
    if saver is not None:
        summary["checkpoints"] = saver.tally()
    return summary


def train_distributed(cfg: RunConfig, quiet: bool = False, download: bool = False,
                      redis_url: str | None = None, threads: int | None = None,
                      log_dir: str | None = None, out_dir: str | None = None,
                      restart: bool = True, devices: str | None = None,
                      tensorboard: str | None = None, resume: Checkpoint | None = None,
                      keep_redis: bool = False) -> dict[str, Any]:
    """`zdni train`: an embedded Redis (unless given), a broker and a worker per stage, here.

    Metric records go to out_dir/metrics.jsonl, the run's Redis stream and, when given, the
    TensorBoard directory `tensorboard`; checkpoints to out_dir/checkpoint/ and, when the run
    ends, the model to out_dir/model.pt (zdni/rundir.py). With `resume`
    (zdni.resume.prepare), go on from that checkpoint.
    """
    cfg.run_id = cfg.run_id or new_run_id(cfg)
    # A bad data set, model or cut is an error before any process starts.
    data = load_data(cfg, download)
    chosen = plan(cfg, data, threads=threads, resumed=resume is not None)
    stages = stage_count(cfg)
    threads = threads or max(1, (os.cpu_count() or 1) // stages)
    specs = parse_list(devices, stages) if devices else None
    with _pinned(other_cores(specs) if specs else None), rundir.closing(
            out_dir, cfg, data.norm, resumed=resume is not None, keep_redis=keep_redis):
        return _run_local(cfg, data, chosen, stages, threads, specs, quiet, redis_url,
                          log_dir, out_dir, restart, resume, tensorboard)


@contextlib.contextmanager
def _pinned(cores: tuple[int, ...] | None) -> Iterator[None]:
    """Run this process (and the children it starts) on `cores` for the block."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _run_local(cfg: RunConfig, data: Data, chosen: dict[str, Any], stages: int, threads: int,
               specs: list[DeviceSpec] | None, quiet: bool, redis_url: str | None,
               log_dir: str | None, out_dir: str | None, restart: bool,
               resume: Checkpoint | None, tensorboard: str | None = None) -> dict[str, Any]:
    """The local cluster of `train_distributed`: Redis (unless given), broker, workers."""
    # The workers import user code only because their own command line names it.
    allow = ["--model", cfg.model] if is_reference(cfg.model) else []
    code = [arg for name in ("loss", "metric") if is_reference(getattr(cfg, name))
            for arg in (f"--{name}", getattr(cfg, name))]
    persist = rundir.journal(out_dir)
    if resume is not None and persist and os.path.isdir(persist):
        shutil.rmtree(persist)  # the checkpoint is what goes on, not the stopped run's Redis
    with local_redis(redis_url, persist) as (url, server), local_address() as broker:
        client = connect(url, fail_fast=True)
        start_clean(client, cfg.run_id, resume)
        metrics = MetricsWriter(cfg, stages, out_dir, client, tensorboard=tensorboard,
                                append=resume is not None)
        # The Redis URL may hold a password: children read it from their environment
        # (ZDNI_REDIS_URL, which every command takes), never from their arguments, which `ps`
        # shows to every local user.
        cluster = Cluster(log_dir=log_dir, env={"ZDNI_REDIS_URL": url})
        # The broker is ours and starting: it may take a few seconds to answer its first ping.
        driver = Driver(cfg, client, broker, metrics, cluster, restart=restart,
                        redis_server=server, broker_wait_s=60.0)
        driver.publish()
        write_run_file(out_dir, run_id=cfg.run_id, redis_url=mask_url(url), broker=broker,
                       out_dir=out_dir, logs=log_dir)
        log.warning("[driver] run %s: Redis %s, broker %s, run directory %s", cfg.run_id,
                    mask_url(url), broker, out_dir or "(none)")
        try:
            with marking_outcome(driver):
                cluster.start("broker", ["broker", "--bind", broker])
                if cfg.synth_placement == "remote" and methods.get(cfg.mode).synthetic:
                    cluster.start("synth", ["synth", "--broker", broker,
                                            "--run", cfg.run_id, "--threads", str(threads),
                                            *allow])
                for s in range(1, stages + 1):
                    place = ["--device", specs[s - 1].text] if specs else \
                        ["--threads", str(threads)]
                    cluster.start(f"stage {s}", ["worker", "--stage", str(s), "--broker", broker,
                                                 "--run", cfg.run_id, *place, *allow, *code])
                summary = _train(driver, data, quiet, cfg, out_dir, resume)
                cluster.stop()  # the broker writes its final counters as it exits
                summary["counts"] = driver.counts()
            return _with_balance(summary, chosen)
        finally:
            cluster.stop()
            metrics.close()
            client.close()


def _with_balance(summary: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
    """The summary, with what --balance chose and measured when it was asked for."""
    if chosen:
        summary["balance"] = chosen
    return summary
