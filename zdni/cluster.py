"""Running a distributed training: a local cluster (`zdni train`) or processes elsewhere (`zdni run`).

Both read the data first (a bad data directory is an error before any process starts), publish
the run, drive it with zdni.driver.Driver and record in Redis whether it finished or failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from zdni import protocol
from zdni.config import RunConfig, new_run_id
from zdni.driver import Driver
from zdni.launcher import Cluster
from zdni.loop import load_data
from zdni.metrics import MetricsWriter
from zdni.models import stage_count
from zdni.plan import plan
from zdni.redisserver import EmbeddedRedis, connect
from zdni.security import Curve
from zdni.transport import free_port_range
from zdni.usercode import is_reference

__all__ = ["run_remote", "train_distributed"]

log = logging.getLogger("zdni.driver")


@contextlib.contextmanager
def marking_outcome(driver: Driver) -> Iterator[None]:
    """Record in Redis whether the block finished the run or failed it."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            driver.set_state(status="failed")
        raise
    driver.set_state(status="finished")


@contextlib.contextmanager
def local_redis(url: str | None) -> Iterator[str]:
    """The given Redis URL, or an embedded server for the duration of the block."""
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


def run_remote(cfg: RunConfig, broker: str, redis_url: str, quiet: bool = False,
               download: bool = False, ready_s: float = 600.0, out_dir: str | None = None,
               curve: Curve | None = None) -> dict[str, Any]:
    """`zdni run`: drive workers and a broker started elsewhere (other hosts, honcho)."""
    cfg.run_id = cfg.run_id or new_run_id(cfg)
    data = load_data(cfg, download)
    chosen = plan(cfg, data)
    client = connect(redis_url)
    metrics = MetricsWriter(cfg, stage_count(cfg), out_dir, client)
    try:
        driver = Driver(cfg, client, broker, metrics, curve=curve, ready_s=ready_s)
        driver.publish()
        log.warning("[driver] run %s published; waiting for %d stage workers", cfg.run_id,
                    driver.stages)
        with marking_outcome(driver):
            summary = driver.train(data, quiet)
            summary["counts"] = driver.counts()
        return _with_balance(summary, chosen)
    finally:
        metrics.close()
        client.close()


def train_distributed(cfg: RunConfig, quiet: bool = False, download: bool = False,
                      redis_url: str | None = None, threads: int | None = None,
                      log_dir: str | None = None, out_dir: str | None = None,
                      restart: bool = True) -> dict[str, Any]:
    """`zdni train`: an embedded Redis (unless given), a broker and a worker per stage, here.

    Metric records go to out_dir/metrics.jsonl and the run's Redis stream.
    """
    cfg.run_id = cfg.run_id or new_run_id(cfg)
    # A bad data set, model or cut is an error before any process starts.
    data = load_data(cfg, download)
    chosen = plan(cfg, data, threads=threads)
    stages = stage_count(cfg)
    threads = threads or max(1, (os.cpu_count() or 1) // stages)
    # The workers import user code only because their own command line names it.
    allow = ["--model", cfg.model] if is_reference(cfg.model) else []
    with local_redis(redis_url) as url:
        client = connect(url)
        metrics = MetricsWriter(cfg, stages, out_dir, client)
        broker = f"tcp://127.0.0.1:{free_port_range(protocol.ENDPOINTS + 1)}"
        cluster = Cluster(log_dir=log_dir)
        driver = Driver(cfg, client, broker, metrics, cluster, restart=restart)
        driver.publish()
        try:
            with marking_outcome(driver):
                cluster.start("broker", ["broker", "--bind", broker, "--redis-url", url])
                if cfg.synth_placement == "remote" and cfg.needs_synth:
                    cluster.start("synth", ["synth", "--broker", broker, "--redis-url", url,
                                            "--run", cfg.run_id, "--threads", str(threads),
                                            *allow])
                for s in range(1, stages + 1):
                    cluster.start(f"stage {s}", ["worker", "--stage", str(s), "--broker", broker,
                                                 "--redis-url", url, "--run", cfg.run_id,
                                                 "--threads", str(threads), *allow])
                summary = driver.train(data, quiet)
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
