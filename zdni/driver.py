"""The distributed runner: feeds batches through the broker, collects what the stages report.

The training loop itself is zdni/loop.py; the in-flight rules are zdni/window.py; which stage
failed is zdni/recovery.py. This file is the socket side: publish the run, send, pump replies,
watch health, evaluate over the wire. zdni/cluster.py starts the processes around it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import redis
import torch
import zmq

from zdni import checkpoint, codec, failure, keys, methods, protocol
from zdni.config import RunConfig, new_run_id
from zdni.device import one_thread
from zdni.launcher import Cluster
from zdni.loop import LoopState, RunError, Saver, State, train
from zdni.metrics import MetricsWriter
from zdni.models import stage_count
from zdni.objective import counts_samples
from zdni.outage import RedisWatch
from zdni.recovery import Recovery
from zdni.redisserver import EmbeddedRedis
from zdni.security import Curve
from zdni.split import Data, Split
from zdni.transport import Endpoint
from zdni.window import Window

__all__ = ["Driver", "StopRequested"]

log = logging.getLogger("zdni.driver")


class StopRequested(RunError):
    """An operator asked (through the dashboard: the run's state field `stop_requested`) that
    the run stop; the driver stops its workers, which back up, and the run is 'stopped'."""

    outcome = "stopped"  # what RUN_DIR/run.json says of the run (zdni/rundir.py)


class Driver:
    """The loop's runner over a broker and stage workers: one run, fed within a window."""

    name = "zdni"

    def __init__(self, cfg: RunConfig, client: redis.Redis, broker: str,
                 metrics: MetricsWriter | None = None, cluster: Cluster | None = None,
                 curve: Curve | None = None, stall_s: float = 120.0, ready_s: float = 120.0,
                 restart: bool = True, redis_server: EmbeddedRedis | None = None,
                 broker_wait_s: float = 5.0) -> None:
        if not cfg.run_id:  # the library's callers get an id as the CLI's do
            cfg.run_id = new_run_id(cfg)
        self.cfg = cfg
        self.redis = client
        self.broker = broker
        self.cluster = cluster
        self.curve = curve
        self.redis_server = redis_server  # our embedded Redis: restarted if it dies
        self.watch = RedisWatch("[driver]", cfg.redis_timeout_s)
        self.broker_wait_s = broker_wait_s  # at start, how long the broker may take to answer
        self.last_pong = self.last_ping = 0.0
        self.unanswered_since: float | None = None  # the oldest ping sent since the last pong
        self.broker_down = False
        self.broker_instance: object = None  # the id in the broker's answers to our pings
        self.stages = stage_count(cfg)
        self.label = f"{cfg.mode} x{self.stages}"
        self.metrics = metrics or MetricsWriter(cfg, self.stages)  # records nowhere by default
        # A method is exact with at most `window` batches in flight (backprop is update-locked:
        # batch t+1 needs the weights batch t's backward updates; that lock is what synthetic
        # gradients remove).
        method = methods.get(cfg.mode)
        size = method.largest_window(cfg)
        if size < cfg.inflight:
            log.warning("[driver] %s mode: %d batch(es) in flight, not %d (the most it is exact "
                        "with)", cfg.mode, size, cfg.inflight)
        elif size <= self.stages and not (cfg.max_inflight is None
                                          and cfg.mode in methods.SAFE_WINDOWS):
            # docs/BENCHMARKS.md section 6; DNI's default window is chosen for accuracy, and a
            # larger one is warned of by the plan (docs/RESULTS.md)
            log.warning("[driver] %d batches in flight keep at most %d of %d stages busy; "
                        "--max-inflight %d lets every stage work", size, size, self.stages,
                        min(2 * self.stages, cfg.ring_size - 1))
        # An iteration (or eval batch) unfinished resend_s after it was fed lost a message on the
        # way (a full queue under a flood, a forged part): it is fed again.
        self.window = Window(self.stages, size, cfg.resend_s)
        self.needs = {i: method.batch_parts(cfg, i, self.stages)
                      for i in range(1, self.stages + 1)}
        self.stall_s = max(stall_s, 4 * cfg.resend_s)  # no message at all this long: give up
        self.ready_s = ready_s  # seconds to wait for every stage's first beat
        self.recovery = Recovery(restart=restart)
        self.eval_results: dict[int, dict[str, Any]] = {}
        self.eval_expected: dict[int, int] = {}  # eval batch -> its size, until its result comes
        self.eval_lost = False  # a restarted broker lost the eval batches it held: send again
        self.in_stream = methods.evaluates_in_stream(cfg, self.stages)  # no drain to evaluate
        self.last_message = time.monotonic()
        self.next_health = 0.0
        self.ctx: zmq.Context | None = None
        self.net: Endpoint | None = None
        # An accuracy's sum counts samples: 0..n is all an honest batch can report.
        self.counts_right = counts_samples(cfg)

    @property
    def fed(self) -> int:
        return self.window.fed

    @property
    def tally(self) -> Any:
        return self.window.tally

    # -- the run in Redis ------------------------------------------------------------------
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
        """Record run state in Redis; skipped (and said once) while Redis is away."""
        self.watch.call(self.redis.hset, keys.state(self.cfg.run_id),
                        mapping={k: str(v) for k, v in fields.items()})

    def set_outcome(self, status: str, wait_s: float = 30.0) -> None:
        """Record how the run ended ('finished', 'failed', 'stopped'): a last word, so it waits
        up to wait_s seconds out a Redis outage (RedisWatch.settle) instead of being skipped."""
        self.watch.settle(self.redis.hset, keys.state(self.cfg.run_id), "status", status,
                          wait_s=wait_s)

    def counts(self) -> dict[str, dict[str, int]]:
        """Every process's message counters, from Redis."""
        out = {}
        for who in ["broker", *[f"stage:{s}" for s in range(1, self.stages + 1)]]:
            raw: dict[Any, Any] = self.watch.settle(  # the run is over: wait out an outage
                self.redis.hgetall, keys.counters(self.cfg.run_id, who)) or {}
            out[who] = {keys.text(k): int(v) for k, v in raw.items()}
        return out

    # -- sockets ---------------------------------------------------------------------------
    def __enter__(self) -> Driver:
        self.ctx = zmq.Context()
        self.net = Endpoint(self.ctx, self.broker, protocol.DRIVER, self.curve)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.net is not None:
            self.net.close()
        if self.ctx is not None:
            self.ctx.term()
        self.net = self.ctx = None

    def send(self, kind: str, it: int, dst: int, tensors: dict[str, torch.Tensor],
             meta: dict[str, Any] | None = None) -> None:
        assert self.net is not None, "use the driver as a context manager"
        self.net.send(codec.encode(codec.Message(kind, self.cfg.run_id, it, protocol.DRIVER, dst,
                                                 tensors, meta or {})))

    def pump(self, timeout_ms: int = 100) -> None:
        """Take one message if one comes within the timeout; check children and stalls."""
        assert self.net is not None, "use the driver as a context manager"
        frames = self.net.recv(timeout_ms)
        if time.monotonic() >= self.next_health:
            self._check_health()
            self.next_health = time.monotonic() + min(0.5, self.cfg.heartbeat_s)
        if frames is None:
            return
        try:
            msg = codec.decode(frames, expect_run=self.cfg.run_id)
        except protocol.MessageError as exc:
            log.error("[driver] dropped a message (%s): %s", exc.reason, exc)
            return
        if msg.kind == protocol.PING and msg.src == protocol.DRIVER:
            self._pong(msg.meta.get("broker"))  # our own ping: not the pipeline progressing
            return
        self.last_message = time.monotonic()
        if msg.kind == protocol.PING:
            log.error("[driver] dropped a ping of endpoint %d", msg.src)
        elif msg.kind == protocol.DONE and 1 <= msg.src <= self.stages:
            self.metrics.observe(msg.src, msg.meta)
            if msg.meta.get(protocol.DONE_EVENT) == protocol.EVENT_UPDATE:
                self.window.done(msg.it, msg.src)
        elif msg.kind == protocol.FAIL and (1 <= msg.src <= self.stages
                                            or msg.src == protocol.SYNTH):
            # A stage's code raised or made non-finite values: no retry can fix it (zdni/failure.py)
            cause = failure.text(msg.meta.get("error")) or \
                f"endpoint {msg.src} failed at iteration {msg.it}; see its log"
            self.window.tally["failed"] += 1
            raise RunError(cause)
        elif msg.kind == protocol.EVAL_RESULT:
            problem = eval_result_problem(msg.src, msg.it, msg.meta, self.stages,
                                          self.eval_expected, self.counts_right)
            if problem:
                log.error("[driver] dropped an eval result: %s", problem)
                self.window.tally["dropped:bad_eval_result"] += 1
            else:
                self.eval_results[msg.it] = msg.meta
                del self.eval_expected[msg.it]
        else:
            log.error("[driver] dropped an unexpected %s message from %d", msg.kind, msg.src)

    # -- the broker ------------------------------------------------------------------------
    def ping(self) -> None:
        """Send a ping to ourselves through the broker (it tells that the broker is there)."""
        self.last_ping = time.monotonic()
        if self.unanswered_since is None:
            self.unanswered_since = self.last_ping
        with contextlib.suppress(TimeoutError):
            self.send(protocol.PING, 0, protocol.DRIVER, {}, {"sent": self.last_ping})

    def _pong(self, instance: object) -> None:
        """Our ping came back. A broker that answers with another instance id than the last
        (zdni/protocol.py PING) was restarted, however briefly: what the old one held is lost."""
        self.last_pong = time.monotonic()
        self.unanswered_since = None
        known, self.broker_instance = self.broker_instance, instance
        restarted = known is not None and instance != known
        if self.broker_down or restarted:  # feed everything in flight again, now
            self.broker_down = False
            log.warning("[driver] the broker at %s answers again%s; feeding the %d batches "
                        "in flight again", self.broker,
                        " (a new instance: it restarted)" if restarted else "",
                        len(self.window.flights))
            self._replay(self.window.inflight, "broker_restart")
            self.eval_lost = bool(self.eval_expected)

    def wait_broker(self) -> None:
        """Return once the broker answers a ping; fail naming its address if it does not."""
        deadline = time.monotonic() + self.broker_wait_s
        while self.last_pong == 0.0:
            if time.monotonic() > deadline:
                raise RunError(f"no broker answering at {self.broker} within "
                               f"{self.broker_wait_s:.0f} s; start `zdni broker --bind "
                               f"{self.broker}` or give --broker")
            if self.cluster is not None:
                for name, code in self.cluster.dead():
                    raise RunError(f"{name} exited with code {code} while starting"
                                   f"{self.cluster.log_hint(name)}")
            if time.monotonic() - self.last_ping > 0.5:
                self.ping()
            self.pump(100)

    def _watch_broker(self, now: float) -> None:
        if now - self.last_ping >= self.cfg.heartbeat_s:
            self.ping()
        silent = now - self.unanswered_since if self.unanswered_since is not None else 0.0
        if not self.broker_down and self.last_pong and silent > 3 * self.cfg.heartbeat_s + 1:
            self.broker_down = True
            log.error("[driver] the broker at %s has not answered for %.0f s; waiting for it",
                      self.broker, silent)

    # -- health ----------------------------------------------------------------------------
    def _check_health(self) -> None:
        now = time.monotonic()
        if self.watch.call(self.redis.hget, keys.state(self.cfg.run_id), "stop_requested"):
            raise StopRequested(f"run {self.cfg.run_id} stopped by the operator at iteration "
                                f"{self.fed}")
        self._watch_broker(now)
        if self.redis_server is not None and not self.redis_server.alive():
            log.error("[driver] the embedded Redis exited; starting it again on port %d",
                      self.redis_server.port)
            self.redis_server.restart()  # same port and directory: it reloads its append file
            self.window.tally["restarts"] += 1
        dead = dict(self.cluster.dead()) if self.cluster is not None else {}
        if dead and not self.recovery.restart:
            name, code = next(iter(dead.items()))
            raise RunError(f"{name} exited with code {code}; see its log for the cause")
        for name in ("broker", "synth"):
            if name in dead and self.cluster is not None:
                log.error("[driver] %s exited with code %s; restarting it", name, dead.pop(name))
                if name == "broker":
                    self.broker_instance = None  # the new one's id is expected: replayed here
                self.cluster.restart(name)
                self.window.tally["restarts"] += 1
                self._replay(self.window.inflight, f"{name}_failed")
        health, pids = self._read_health()
        for stage in self.recovery.failed(dead, health, pids, now, self.cfg.heartbeat_s):
            self._recover(stage, dead)
        lost = self.window.lost(now)
        if lost is not None:
            if lost.stuck:
                raise RunError(f"stages {lost.behind} finished no iteration in "
                               f"{self.window.lost_streak * self.window.lost_s:.0f} s while "
                               f"receiving; see their logs for the messages they dropped")
            log.error("[driver] iterations %s unfinished after %.0f s (stages %s never reported"
                      " them): a message was lost; feeding their batches again", lost.iterations,
                      self.window.lost_s, lost.behind)
            self._replay(lost.iterations, "lost")
        if now - self.last_message > self.stall_s:  # our own pings do not count
            if self.broker_down:
                raise RunError(f"the broker at {self.broker} has not answered for "
                               f"{self.stall_s:.0f} s; start it again (zdni broker --bind "
                               f"{self.broker}) and this run with it")
            raise RunError(f"no message from any stage for {self.stall_s:.0f} s; stages "
                           f"behind: {self.window.behind()}; see their logs")

    def _read_health(self) -> tuple[dict[int, str], dict[int, str]]:
        """Beat the driver's heartbeat, anchor `fed` for restarted workers, and read the
        broker's verdicts and each stage's pid; nothing (and no verdict) while Redis is away.
        A Redis that came back empty gets the run published again."""
        run = self.cfg.run_id
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(keys.config(run))
        pipe.set(keys.driver_beat(run), time.time(), ex=max(int(5 * self.cfg.heartbeat_s), 2))
        pipe.hset(keys.state(run), "fed", self.fed)  # a restarted worker's anchor
        pipe.hgetall(keys.health(run))
        for s in range(1, self.stages + 1):
            pipe.hget(keys.heartbeat(run, s), "pid")
        got = self.watch.call(pipe.execute)
        if got is None:
            return {}, {}
        if not got[0]:  # Redis lost the run (restarted empty): publish it again
            log.error("[driver] Redis came back without run %s; publishing it again", run)
            self.window.tally["republished"] += 1
            self.watch.call(self.publish)
            self.set_state(status="running", fed=self.fed)
        health = {int(keys.text(k)): keys.text(v) for k, v in got[3].items()}
        pids = {s: keys.text(p) for s, p in zip(range(1, self.stages + 1), got[4:]) if p}
        return health, pids

    def _recover(self, stage: int, dead: dict[str, int]) -> None:
        """Stage `stage` failed: restart it if it is ours, replay the batches it lost."""
        name = f"stage {stage}"
        log.error("[driver] stage %d failed (exit code %s); recovering", stage, dead.get(name))
        if self.cluster is not None and name in dead:
            self.watch.call(self.redis.hset, keys.health(self.cfg.run_id), str(stage),
                            "restarting")
            self.cluster.restart(name)
            self.window.tally["restarts"] += 1
        self._replay(self.window.unfinished_by(stage), "stage_failed")

    def _replay(self, lost: list[int], reason: str) -> None:
        self.window.drop(lost, reason)
        log.warning("[driver] replaying %d batches lost to %s", len(lost), reason)

    def wait_ready(self) -> None:
        """Wait until every stage beats 'alive' for this run."""
        deadline = time.monotonic() + self.ready_s
        while True:
            pipe = self.redis.pipeline(transaction=False)
            for s in range(1, self.stages + 1):
                pipe.hget(keys.heartbeat(self.cfg.run_id, s), "status")
            missing: list[int | str] = [
                s for s, v in zip(range(1, self.stages + 1), pipe.execute()) if v != b"alive"]
            if self.cfg.synth_placement == "remote" and methods.get(self.cfg.mode).synthetic:
                synth = self.redis.hget(keys.heartbeat(self.cfg.run_id, protocol.SYNTH), "status")
                missing += [] if synth == b"alive" else ["synth"]
            if not missing:
                return
            if self.cluster is not None:
                for name, code in self.cluster.dead():
                    raise RunError(f"{name} exited with code {code} while starting"
                                   f"{self.cluster.log_hint(name)}")
            if time.monotonic() > deadline:
                raise RunError(f"stages {missing} did not start within {self.ready_s:.0f} s")
            time.sleep(0.1)

    # -- the runner (zdni.loop.Runner) -----------------------------------------------------
    def train(self, data: Data, quiet: bool = False, start: LoopState | None = None,
              saver: Saver | None = None) -> dict[str, Any]:
        """Wait for the stages, run the loop (from `start`, checkpointing through `saver`),
        stop the workers; returns the summary."""
        with self, one_thread():
            self.wait_broker()
            self.wait_ready()
            self.set_state(status="running")
            try:
                summary = train(self.cfg, self, data, self.metrics, quiet, start, saver)
            except StopRequested:
                self.stop_workers()  # they back up where they are, then stop
                raise
            self.stop_workers()
            return summary

    def replays(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.window.replay:
            yield self.window.replay.popleft()

    def feed(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Send the next iteration's batch to every stage that needs part of it."""
        while self.window.full():
            self.pump()
        it = self.window.feed((x, y), time.monotonic())
        for stage, (needs_x, needs_y) in self.needs.items():
            tensors = {}
            if needs_x:
                tensors["x"] = x
            if needs_y:
                tensors["y"] = y
            if tensors:
                self.send(protocol.BATCH, it, stage, tensors)
        return self.fed

    def drain(self) -> None:
        while self.window.flights:
            self.pump()

    def before_evaluation(self) -> None:
        """Drain, unless every stage updates as an iteration's input reaches it
        (zdni.methods.evaluates_in_stream): then the evaluation batches queue behind the last
        iteration fed at every stage and see its parameters while the window still holds
        iterations finishing. On two pinned cores this saves the drain and the refill, ~0.1 s
        per evaluation (docs/BENCHMARKS.md section 10)."""
        if not self.in_stream:
            self.drain()

    def settle(self) -> None:
        while self.window.flights or self.window.replay:
            while self.window.replay and not self.window.full():
                self.feed(*self.window.replay.popleft())
            self.pump()

    def flight(self) -> tuple[int | None, dict[int, int] | None]:
        return len(self.window.flights), self.window.lags()

    def progress(self) -> dict[str, Any]:
        return {"lag": max(self.window.lags().values())}

    def epoch_end(self, epoch: int, scores: dict[str, float], best: bool) -> None:
        self.set_state(epoch=epoch, iteration=self.fed, **scores)
        log.info("[driver] epoch %d: %s%s", epoch, ", ".join(
            f"{k.replace('_', ' ')} {v:.4g}" for k, v in scores.items()), " (best)" if best else "")

    def summary_extra(self) -> dict[str, Any]:
        return {"max_inflight": self.window.size, "ring_size": self.cfg.ring_size,
                "tally": dict(self.window.tally)}

    def start_at(self, fed: int) -> None:
        self.window.start_at(fed)
        self.set_state(fed=fed)

    def snapshot(self, timeout_s: float = 60.0) -> dict[int, State] | None:
        """Settle, have every stage back up at the last iteration fed and confirm it; their
        states from Redis (and the synthesizer service's newest backup up to there). An
        ordered run's stages are asked first: the checkpoint ends their segment there (a drain,
        as in process), and the iterations before it can finish only once they know."""
        asked = 0.0
        if self.cfg.ordered and self.fed > 0:
            self._ask_checkpoint(self.fed - 1)
            asked = time.monotonic()
        self.settle()
        label = self.fed - 1
        if label < 0:
            return None
        deadline = time.monotonic() + timeout_s
        run = self.cfg.run_id
        while not self.watch.call(checkpoint.confirmed, self.redis, run, self.stages, label):
            if time.monotonic() > deadline:
                return None
            if time.monotonic() - asked > 5.0:  # again after a while: a broker restart loses it
                asked = time.monotonic()
                self._ask_checkpoint(label)
            self.pump(50)
        remote = self.cfg.synth_placement == "remote" and methods.get(self.cfg.mode).synthetic
        return self.watch.call(checkpoint.gather, self.redis, run, self.stages, label, remote)

    def _ask_checkpoint(self, label: int) -> None:
        for stage in range(1, self.stages + 1):
            with contextlib.suppress(TimeoutError):
                self.send(protocol.CONTROL, label, stage, {},
                          {"op": protocol.OP_CHECKPOINT, "at": label})

    def evaluate(self, split: Split, epoch: int) -> tuple[float, float]:
        """Forward a split through the stages, batch by batch (at most max_inflight batches
        held, read as they are sent); (mean loss, mean metric)."""
        self.eval_results.clear()
        self.eval_expected.clear()
        batches = iter(split.eval_batches(self.cfg.eval_batch_size, self.cfg.seed,
                                          self.cfg.data_workers))
        held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # sent, not yet answered
        sent_at: dict[int, float] = {}

        def send(b: int) -> None:
            x, y = held[b]
            self.eval_expected[b] = len(x)
            sent_at[b] = time.monotonic()
            self.send(protocol.EVAL, b, 1, {"h": x.contiguous(), "y": y.contiguous()},
                      {"epoch": epoch})

        sent = samples = 0
        more = True
        lost_s = self.window.lost_s
        tries: dict[int, int] = {}  # eval batch -> times it was sent again for want of an answer
        while more or self.eval_expected:
            while more and len(self.eval_expected) < self.cfg.inflight:
                nxt = next(batches, None)
                if nxt is None:
                    more = False
                    break
                held[sent] = nxt
                samples += len(nxt[0])
                send(sent)
                sent += 1
            self.pump()
            for b in [b for b in held if b not in self.eval_expected]:
                del held[b]  # answered
            if self.eval_lost:  # the broker came back empty: what it held will never arrive
                self.eval_lost = False
                log.warning("[driver] sending the %d unanswered eval batches again",
                            len(self.eval_expected))
                for b in list(self.eval_expected):
                    self.window.tally["resent:eval"] += 1
                    send(b)
            for b in [b for b in self.eval_expected if time.monotonic() - sent_at[b] > lost_s]:
                tries[b] = tries.get(b, 0) + 1
                if tries[b] > self.window.tries:  # as many tries as a training batch gets
                    raise RunError(f"evaluation batch {b} unanswered after {tries[b]} tries of "
                                   f"{lost_s:.0f} s (--resend-after); see the stages' logs for "
                                   f"the messages they dropped")
                log.error("[driver] eval batch %d unanswered after %.0f s: sending it again",
                          b, lost_s)
                self.window.tally["resent:eval"] += 1
                send(b)  # evaluation changes no state: sending it again is safe
        loss = sum(r["loss_sum"] for r in self.eval_results.values()) / samples
        metric = sum(r["metric_sum"] for r in self.eval_results.values())
        return loss, metric / samples

    def stop_workers(self, timeout_s: float = 30.0) -> None:
        """Ask every stage to back up and stop; wait for their 'stopped' beats."""
        for stage in range(1, self.stages + 1):
            with contextlib.suppress(TimeoutError):
                self.send(protocol.CONTROL, max(self.fed - 1, 0), stage, {},
                          {"op": protocol.OP_STOP})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pipe = self.redis.pipeline(transaction=False)
            for s in range(1, self.stages + 1):
                pipe.hget(keys.heartbeat(self.cfg.run_id, s), "status")
            statuses: list[Any] | None = self.watch.call(pipe.execute)
            if statuses is not None and all(v in (b"stopped", None) for v in statuses):
                return
            time.sleep(0.1)


def eval_result_problem(src: int, it: int, meta: dict[str, Any], stages: int,
                        expected: dict[int, int], counts: bool = True) -> str | None:
    """Why an eval result cannot be taken (pure), or None: it must answer an outstanding batch,
    come from the last stage and hold finite sums of loss and metric; with `counts` (accuracy)
    the metric's sum is a count of samples, 0..n."""
    if src != stages:
        return f"from endpoint {src}, not the last stage {stages}"
    if it not in expected:
        return f"batch {it} is not outstanding"
    n, metric, loss = meta.get("n"), meta.get("metric_sum"), meta.get("loss_sum")
    if n != expected[it] or not isinstance(metric, float) or not math.isfinite(metric) or (
            counts and not 0 <= metric <= expected[it]):
        return f"batch {it}: n={n!r} metric_sum={metric!r}, expected n={expected[it]}"
    if not isinstance(loss, float) or not math.isfinite(loss):
        return f"batch {it}: loss_sum {loss!r} is not a finite number"
    return None
