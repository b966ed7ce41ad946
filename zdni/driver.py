"""The driver: publishes a run, feeds batches through the broker within a window, evaluates, summarizes.

`zdni train` runs it with a local cluster (embedded Redis, broker, one worker per stage);
`zdni run` runs it alone against a broker and workers started elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator
from typing import Any

import redis
import torch
import zmq

from zdni import codec, keys, protocol
from zdni.config import RunConfig, new_run_id
from zdni.data import BatchFeeder, load_dataset
from zdni.inbox import batch_parts
from zdni.launcher import Cluster
from zdni.metrics import MetricsWriter
from zdni.models import stage_count
from zdni.progress import Progress
from zdni.recovery import Recovery
from zdni.redisserver import EmbeddedRedis, connect
from zdni.summary import EpochStats, build_summary
from zdni.transport import Endpoint, free_port_range

log = logging.getLogger("zdni.driver")


class RunError(RuntimeError):
    """The run cannot go on: a stage died, stalled or never started. The message says which."""


LOST_TRIES = 3  # lost iterations fed again in a row before the run is declared stuck


class Driver:
    """Feeds one run and collects what the stages report."""

    def __init__(self, cfg: RunConfig, client: redis.Redis, broker: str,
                 cluster: Cluster | None = None, quiet: bool = False,
                 stall_s: float = 120.0) -> None:
        if not cfg.run_id:  # the library's callers get an id as the CLI's do
            cfg.run_id = new_run_id(cfg)
        self.cfg = cfg
        self.redis = client
        self.broker = broker
        self.cluster = cluster
        self.quiet = quiet
        self.stages = stage_count(cfg)
        # Backprop is update-locked: batch t+1 needs the weights batch t's backward updates, so
        # exact backprop has one batch in flight; that lock is what synthetic gradients remove.
        self.window = 1 if cfg.mode == "backprop" else cfg.max_inflight
        if self.window < cfg.max_inflight:
            log.warning("[driver] backprop mode: one batch in flight (update locking), not %d",
                        cfg.max_inflight)
        self.needs = {i: batch_parts(cfg, i, self.stages) for i in range(1, self.stages + 1)}
        self.updates: dict[int, set[int]] = defaultdict(set)  # iteration -> stages done with it
        self.inflight: set[int] = set()
        self.batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # in flight, for replay
        self.fed_at: dict[int, float] = {}  # in flight: when it was fed
        # An iteration (or eval batch) unfinished this long lost a message on the way (a full
        # queue under a flood, a forged part): it is fed again. Far above any real step time.
        self.lost_s = cfg.resend_s
        self.lost_streak = 0  # feeds-again in a row with no iteration finished between them
        self.stall_s = max(stall_s, 4 * self.lost_s)  # no message at all this long: give up
        self.recovery = Recovery(restart=True)
        self.tally: Counter[str] = Counter()  # fed, replayed, dropped:REASON, restarts
        self.last_done = dict.fromkeys(range(1, self.stages + 1), -1)
        self.stats = EpochStats()
        self.eval_results: dict[int, dict[str, Any]] = {}
        self.last_message = time.monotonic()
        self.fed = 0
        self.ready_s = 120.0  # seconds to wait for every stage's first beat
        self.next_health = 0.0
        self.eval_expected: dict[int, int] = {}  # eval batch -> its size, until its result comes
        self.replay: deque[tuple[torch.Tensor, torch.Tensor]] = deque()
        self.metrics = MetricsWriter(cfg, self.stages)  # records nowhere until replaced

    def publish(self) -> None:
        """Make the run known: config, current run, run list, state."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(keys.config(self.cfg.run_id), self.cfg.to_json())
        pipe.set(keys.current_run(), self.cfg.run_id)
        pipe.zadd(keys.runs(), {self.cfg.run_id: time.time()})
        pipe.hset(keys.state(self.cfg.run_id), mapping={"status": "starting", "stages": self.stages,
                                                         "started": time.time(),
                                                         "broker": self.broker})
        pipe.execute()

    def set_state(self, **fields: Any) -> None:
        self.redis.hset(keys.state(self.cfg.run_id), mapping={k: str(v) for k, v in fields.items()})

    # -- messages -------------------------------------------------------------------------
    def _send(self, kind: str, it: int, dst: int, tensors: dict[str, torch.Tensor],
              meta: dict[str, Any] | None = None) -> None:
        self.net.send(codec.Message(kind, self.cfg.run_id, it, protocol.DRIVER, dst, tensors,
                                    meta or {}))

    def pump(self, timeout_ms: int = 100) -> None:
        """Take one message if one comes within the timeout; check children and stalls."""
        frames = self.net.recv(timeout_ms)
        if time.monotonic() >= self.next_health:
            self._check_health()
            self.next_health = time.monotonic() + min(0.5, self.cfg.heartbeat_s)
        if frames is None:
            return
        self.last_message = time.monotonic()
        try:
            msg = codec.decode(frames, expect_run=self.cfg.run_id)
        except codec.DecodeError as exc:
            log.error("[driver] dropped a message (%s): %s", exc.reason, exc)
            return
        if msg.kind == protocol.DONE and 1 <= msg.src <= self.stages:
            self.stats.add(msg.src, {k: v for k, v in msg.meta.items()
                                     if isinstance(v, float) and math.isfinite(v)})
            self.metrics.observe(msg.src, msg.meta)
            if msg.meta.get("event") == "update" and msg.it in self.inflight:
                self.last_done[msg.src] = max(self.last_done[msg.src], msg.it)
                self.updates[msg.it].add(msg.src)
                if len(self.updates[msg.it]) >= self.stages:
                    self.inflight.discard(msg.it)
                    self.batches.pop(msg.it, None)
                    self.fed_at.pop(msg.it, None)
                    del self.updates[msg.it]
                    self.lost_streak = 0
        elif msg.kind == protocol.EVAL_RESULT:
            problem = _eval_result_problem(msg.src, msg.it, msg.meta, self.stages, self.eval_expected)
            if problem:
                log.error("[driver] dropped an eval result: %s", problem)
                self.tally["dropped:bad_eval_result"] += 1
            else:
                self.eval_results[msg.it] = msg.meta
                del self.eval_expected[msg.it]
        else:
            log.error("[driver] dropped an unexpected %s message from %d", msg.kind, msg.src)

    def _check_health(self) -> None:
        dead = dict(self.cluster.dead()) if self.cluster is not None else {}
        if dead and not self.recovery.restart:
            name, code = next(iter(dead.items()))
            raise RunError(f"{name} exited with code {code}; see its log for the cause")
        for name in ("broker", "synth"):
            if name in dead and self.cluster is not None:
                log.error("[driver] %s exited with code %s; restarting it", name, dead.pop(name))
                self.cluster.restart(name)
                self.tally["restarts"] += 1
                self._replay(sorted(self.inflight), f"{name}_failed")
        self.redis.hset(keys.state(self.cfg.run_id), "fed", self.fed)  # a restarted worker's anchor
        health = {int(keys.text(k)): keys.text(v) for k, v in
                  self.redis.hgetall(keys.health(self.cfg.run_id)).items()}
        pipe = self.redis.pipeline(transaction=False)
        for s in range(1, self.stages + 1):
            pipe.hget(keys.heartbeat(self.cfg.run_id, s), "pid")
        pids = {s: keys.text(p) for s, p in zip(range(1, self.stages + 1), pipe.execute()) if p}
        for stage in self.recovery.failed(dead, health, pids, time.monotonic(),
                                          self.cfg.heartbeat_s):
            self._recover(stage, dead)
        lost = sorted(t for t in self.inflight if time.monotonic() - self.fed_at[t] > self.lost_s)
        if lost:
            behind = [s for s in range(1, self.stages + 1) if s not in self.updates.get(lost[0], ())]
            self.lost_streak += 1
            if self.lost_streak > LOST_TRIES:
                raise RunError(f"stages {behind} finished no iteration in "
                               f"{self.lost_streak * self.lost_s:.0f} s while receiving; "
                               f"see their logs for the messages they dropped")
            log.error("[driver] iterations %s unfinished after %.0f s (stages %s never reported"
                      " them): a message was lost; feeding their batches again", lost,
                      self.lost_s, behind)
            self._replay(lost, "lost")
        if time.monotonic() - self.last_message > self.stall_s:
            behind = [s for s, it in self.last_done.items() if it < self.fed - 1]
            raise RunError(f"no message for {self.stall_s:.0f} s; stages behind: {behind}")

    def _recover(self, stage: int, dead: dict[str, int]) -> None:
        """Stage `stage` failed: restart it if it is ours, replay the batches it lost."""
        name = f"stage {stage}"
        log.error("[driver] stage %d failed (exit code %s); recovering", stage, dead.get(name))
        if self.cluster is not None and name in dead:
            self.redis.hset(keys.health(self.cfg.run_id), str(stage), "restarting")
            self.cluster.restart(name)
            self.tally["restarts"] += 1
        self._replay(sorted(t for t in self.inflight if stage not in self.updates.get(t, ())),
                     "stage_failed")

    def _replay(self, lost: list[int], reason: str) -> None:
        """Count iterations as dropped and feed their batches again as new iterations,
        so that no stage ever trains one iteration twice."""
        for t in lost:
            self.inflight.discard(t)
            self.updates.pop(t, None)
            self.fed_at.pop(t, None)
            self.replay.append(self.batches.pop(t))
            self.tally[f"dropped:{reason}"] += 1
            self.tally["replayed"] += 1
        log.warning("[driver] replaying %d batches lost to %s", len(lost), reason)

    # -- the run --------------------------------------------------------------------------
    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Wait until every stage beats 'alive' for this run."""
        deadline = time.monotonic() + timeout_s
        while True:
            pipe = self.redis.pipeline(transaction=False)
            for s in range(1, self.stages + 1):
                pipe.hget(keys.heartbeat(self.cfg.run_id, s), "status")
            missing: list[int | str] = [
                s for s, v in zip(range(1, self.stages + 1), pipe.execute()) if v != b"alive"]
            if self.cfg.synth_placement == "remote" and self.cfg.needs_synth:
                synth = self.redis.hget(keys.heartbeat(self.cfg.run_id, protocol.SYNTH), "status")
                missing += [] if synth == b"alive" else ["synth"]
            if not missing:
                return
            if self.cluster is not None:
                for name, code in self.cluster.dead():
                    raise RunError(f"{name} exited with code {code} while starting")
            if time.monotonic() > deadline:
                raise RunError(f"stages {missing} did not start within {timeout_s:.0f} s")
            time.sleep(0.1)

    def train(self, download: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        x_train, y_train = load_dataset(cfg.dataset, cfg.data_dir, True, download, cfg.train_limit)
        x_test, y_test = load_dataset(cfg.dataset, cfg.data_dir, False, download, cfg.test_limit)
        feeder = BatchFeeder(x_train, y_train, cfg.batch_size, cfg.seed)
        ctx = zmq.Context()
        self.net = Endpoint(ctx, self.broker, protocol.DRIVER)
        try:
            self.wait_ready(self.ready_s)
            self.set_state(status="running")
            summary = self._loop(feeder, x_test, y_test)
            self.stop_workers()
            return summary
        finally:
            self.metrics.close()
            self.net.close()
            ctx.term()

    def _loop(self, feeder: BatchFeeder, x_test: torch.Tensor, y_test: torch.Tensor
              ) -> dict[str, Any]:
        cfg = self.cfg
        total = feeder.batches_per_epoch * cfg.epochs
        progress = Progress(total, f"{cfg.mode} x{self.stages}", quiet=self.quiet)
        history: list[dict[str, Any]] = []
        start = time.monotonic()
        samples = 0
        accuracy = None
        for epoch in range(cfg.epochs):
            self.stats = EpochStats()
            batches = feeder.iter_epoch(epoch)
            for xb, yb in _with_replays(batches, self.replay):
                while len(self.inflight) >= self.window:
                    self.pump()
                self.feed(self.fed, xb, yb)
                samples += len(xb)
                progress.update(self.fed, epoch=epoch + 1,
                                loss=self.stats.losses[-1] if self.stats.losses else None,
                                acc=accuracy, sps=round(samples / (time.monotonic() - start)),
                                lag=self.fed - 1 - min(self.last_done.values()))
                self.metrics.iteration(self.fed, epoch + 1, samples, time.monotonic() - start,
                                       len(self.inflight),
                                       {s: self.fed - 1 - d for s, d in self.last_done.items()})
                if cfg.eval_every and self.fed % cfg.eval_every == 0 and (
                        self.fed % feeder.batches_per_epoch):
                    while self.inflight:  # evaluate the parameters of one iteration, not a mix
                        self.pump()
                    result = self.evaluate(x_test, y_test, epoch)
                    _, accuracy = self.metrics.eval(self.fed, epoch + 1,
                                                    time.monotonic() - start, *result)
            while self.inflight or self.replay:
                while self.replay and len(self.inflight) < self.window:
                    self.feed(self.fed, *self.replay.popleft())
                self.pump()
            test_loss, accuracy = self.evaluate(x_test, y_test, epoch)
            row = self.stats.row(epoch + 1, test_loss, accuracy, time.monotonic() - start, self.fed)
            history.append(row)
            self.metrics.epoch(row, samples)
            self.set_state(epoch=epoch + 1, iteration=self.fed, test_accuracy=accuracy)
            log.info("[driver] epoch %d: test accuracy %.4f", epoch + 1, accuracy)
        progress.close()
        wall = time.monotonic() - start
        return build_summary(cfg, self.stages, history, self.fed, samples, wall, runner="zdni",
                             extra={"max_inflight": self.window, "ring_size": cfg.ring_size,
                                    "tally": dict(self.tally)})

    def feed(self, it: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Send iteration `it`'s batch to every stage that needs part of it."""
        self.inflight.add(it)
        self.batches[it] = (x, y)
        self.fed_at[it] = time.monotonic()
        self.tally["fed"] += 1
        for stage, (needs_x, needs_y) in self.needs.items():
            tensors = {}
            if needs_x:
                tensors["x"] = x
            if needs_y:
                tensors["y"] = y
            if tensors:
                self._send(protocol.BATCH, it, stage, tensors)
        self.fed = it + 1

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[float, float]:
        """Forward the test set through the stages; (mean loss, accuracy)."""
        self.eval_results.clear()
        self.eval_expected.clear()
        batch = self.cfg.eval_batch_size
        starts = list(range(0, len(x), batch))
        sent_at: dict[int, float] = {}

        def send(b: int) -> None:
            a = starts[b]
            self.eval_expected[b] = min(batch, len(x) - a)
            sent_at[b] = time.monotonic()
            self._send(protocol.EVAL, b, 1, {"h": x[a : a + batch].contiguous(),
                                             "y": y[a : a + batch].contiguous()}, {"epoch": epoch})

        sent = 0
        while len(self.eval_results) < len(starts):
            while sent < len(starts) and sent - len(self.eval_results) < self.cfg.max_inflight:
                send(sent)
                sent += 1
            self.pump()
            for b in [b for b in self.eval_expected if time.monotonic() - sent_at[b] > self.lost_s]:
                log.error("[driver] eval batch %d unanswered after %.0f s: sending it again",
                          b, self.lost_s)
                self.tally["resent:eval"] += 1
                send(b)  # evaluation changes no state: sending it again is safe
        loss = sum(r["loss_sum"] for r in self.eval_results.values()) / len(x)
        correct = sum(r["correct"] for r in self.eval_results.values())
        return loss, correct / len(x)

    def stop_workers(self, timeout_s: float = 30.0) -> None:
        """Ask every stage to back up and stop; wait for their 'stopped' beats."""
        for stage in range(1, self.stages + 1):
            with contextlib.suppress(TimeoutError):
                self._send(protocol.CONTROL, max(self.fed - 1, 0), stage, {}, {"op": "stop"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            statuses = [self.redis.hget(keys.heartbeat(self.cfg.run_id, s), "status")
                        for s in range(1, self.stages + 1)]
            if all(v in (b"stopped", None) for v in statuses):
                return
            time.sleep(0.1)

    def counts(self) -> dict[str, dict[str, int]]:
        """Every process's message counters, from Redis."""
        out = {}
        for who in ["broker", *[f"stage:{s}" for s in range(1, self.stages + 1)]]:
            raw = self.redis.hgetall(keys.counters(self.cfg.run_id, who))
            out[who] = {keys.text(k): int(v) for k, v in raw.items()}
        return out


def check_data(cfg: RunConfig, download: bool) -> None:
    """Read the dataset now (it is cached for the run): missing files raise DataError early."""
    load_dataset(cfg.dataset, cfg.data_dir, True, download, cfg.train_limit)
    load_dataset(cfg.dataset, cfg.data_dir, False, download, cfg.test_limit)


def run_remote(cfg: RunConfig, broker: str, redis_url: str, quiet: bool = False,
               download: bool = False, ready_s: float = 600.0,
               out_dir: str | None = None) -> dict[str, Any]:
    """`zdni run`: drive workers and a broker started elsewhere (other hosts, honcho)."""
    check_data(cfg, download)
    client = connect(redis_url)
    driver = Driver(cfg, client, broker, None, quiet)
    driver.metrics = MetricsWriter(cfg, driver.stages, out_dir, client)
    driver.ready_s = ready_s
    driver.publish()
    log.warning("[driver] run %s published; waiting for %d stage workers", cfg.run_id,
                driver.stages)
    try:
        with marking_outcome(driver):
            summary = driver.train(download)
            summary["counts"] = driver.counts()
        return summary
    finally:
        client.close()


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


def _eval_result_problem(src: int, it: int, meta: dict[str, Any], stages: int,
                         expected: dict[int, int]) -> str | None:
    """Why an eval result cannot be taken (pure), or None: it must answer an outstanding batch,
    come from the last stage and hold a count and loss that batch can have."""
    if src != stages:
        return f"from endpoint {src}, not the last stage {stages}"
    if it not in expected:
        return f"batch {it} is not outstanding"
    n, correct, loss = meta.get("n"), meta.get("correct"), meta.get("loss_sum")
    if n != expected[it] or not isinstance(correct, int) or not 0 <= correct <= expected[it]:
        return f"batch {it}: n={n!r} correct={correct!r}, expected n={expected[it]}"
    if not isinstance(loss, float) or not math.isfinite(loss) or loss < 0:
        return f"batch {it}: loss_sum {loss!r} is not a finite non-negative number"
    return None


def _with_replays(batches: Iterable[tuple[int, torch.Tensor, torch.Tensor]],
                  replay: deque[tuple[torch.Tensor, torch.Tensor]]
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's batches, with any batch waiting for replay fed first."""
    for _, xb, yb in batches:
        while replay:
            yield replay.popleft()
        yield xb, yb


@contextlib.contextmanager
def local_redis(url: str | None) -> Iterator[str]:
    """The given Redis URL, or an embedded server for the duration of the block."""
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


def train_distributed(cfg: RunConfig, quiet: bool = False, download: bool = False,
                      redis_url: str | None = None, threads: int | None = None,
                      log_dir: str | None = None, out_dir: str | None = None,
                      restart: bool = True) -> dict[str, Any]:
    """`zdni train`: an embedded Redis (unless given), a broker and a worker per stage, here.

    Metric records go to out_dir/metrics.jsonl and the run's Redis stream.
    """
    stages = stage_count(cfg)
    threads = threads or max(1, (os.cpu_count() or 1) // stages)
    check_data(cfg, download)  # a bad data directory is an error before any process starts
    with local_redis(redis_url) as url:
        client = connect(url)
        base = free_port_range(protocol.ENDPOINTS + 1)
        broker = f"tcp://127.0.0.1:{base}"
        cluster = Cluster(log_dir=log_dir)
        driver = Driver(cfg, client, broker, cluster, quiet)
        driver.recovery.restart = restart
        driver.metrics = MetricsWriter(cfg, driver.stages, out_dir, client)
        driver.publish()
        try:
            with marking_outcome(driver):
                cluster.start("broker", ["broker", "--bind", broker, "--redis-url", url])
                if cfg.synth_placement == "remote" and cfg.needs_synth:
                    cluster.start("synth", ["synth", "--broker", broker, "--redis-url", url,
                                            "--run", cfg.run_id, "--threads", str(threads)])
                for s in range(1, stages + 1):
                    cluster.start(f"stage {s}", ["worker", "--stage", str(s), "--broker", broker,
                                                 "--redis-url", url, "--run", cfg.run_id,
                                                 "--threads", str(threads)])
                summary = driver.train(download)
                cluster.stop()  # the broker writes its final counters as it exits
                summary["counts"] = driver.counts()
            return summary
        finally:
            cluster.stop()
            client.close()
