"""The stage worker process: receive a message, apply it to zdni.stage, send what it produced."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections import Counter, OrderedDict, deque
from typing import Any

import torch
import zmq

from zdni import checkpoint, codec, failure, keys, methods, protocol
from zdni.buffer import RedisRing, RingWriter
from zdni.codec import Message
from zdni.device import to_host
from zdni.failure import StageFailure
from zdni.header import MAX_META
from zdni.health import beat
from zdni.held import Held
from zdni.inbox import Inbox, check_tensor
from zdni.models import build_stages, input_shape, stage_shapes
from zdni.objective import check_targets
from zdni.outage import RedisGone, RedisWatch
from zdni.protocol import MessageError
from zdni.redisserver import connect
from zdni.rng import span
from zdni.schedule import Cursor, Turns
from zdni.security import Curve
from zdni.shell import Stopper, read_config, setup_logging
from zdni.stage import Outcome, Stage, StageError
from zdni.synthservice import RemoteSynth
from zdni.transport import Endpoint
from zdni.usercode import check_allowed, check_named

log = logging.getLogger("zdni.worker")
# The kinds whose handling runs the user's model, and the event each is (zdni.failure.guard).
EVENTS = {protocol.BATCH: "batch", protocol.ACT: "input", protocol.GRAD: "grad",
          protocol.EVAL: "eval", protocol.SYNTH_REP: "grad"}
RECENT = 4096  # iterations remembered as finished, to drop replays
RPC_TIMEOUT_S = 60.0  # a synthesizer service silent this long is an error, not a hang
RPC_RESEND_S = 3.0  # unanswered this long, a request is sent again (a restarted service lost it)
BACKLOG = 8192  # messages held while waiting for the synthesizer; the window keeps it small
LAST_BEAT_S = 30.0  # a stopped stage's last beat waits out a Redis outage this long (the driver
# reads its counters) ...
SIGNALLED_LAST_BEAT_S = 2.0  # ... and this long when a signal stopped it (it is asked to leave)


class Worker:
    """One stage of one run, served from the broker until the driver says stop."""

    def __init__(self, stage: int, broker: str, redis_url: str, run: str | None = None,
                 device: str = "cpu", threads: int | None = None,
                 checkpoint_dir: str | None = None, wait_s: float = 60.0,
                 curve: Curve | None = None, allow_model: str | None = None,
                 served: frozenset[str] = frozenset(),
                 allow_code: frozenset[str] = frozenset()) -> None:
        self.index = stage
        self.broker = broker
        self.curve = curve
        self.device = device
        self.pin = device.startswith("cuda")  # receive into pinned memory, send through it
        self.checkpoint_dir = checkpoint_dir
        self.who = f"[stage {stage}]"
        self.attempt = ""  # the start of the run served (zdni.worker.attempt), when waited for
        self.redis = connect(redis_url, fail_fast=True)
        self.run = run or self._wait_for_run(wait_s, served)
        self.cfg = read_config(self.redis, self.run, self.who)
        self.watch = RedisWatch(self.who, self.cfg.redis_timeout_s)
        check_allowed(self.cfg.model, allow_model, self.who)  # before any user code is imported
        modules = build_stages(self.cfg)
        if stage == len(modules):  # the last stage imports the loss and metric
            check_named(self.cfg.loss, allow_code, self.who, "--loss")
            check_named(self.cfg.metric, allow_code, self.who, "--metric")
        # Unless told, assume every stage shares this host (honcho, one machine): torch's default
        # of a thread per core in each of K workers oversubscribes the cores (docs/BENCHMARKS.md).
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // len(modules)))
        if not 1 <= stage <= len(modules):
            raise SystemExit(f"{self.who} run {self.run} has stages 1..{len(modules)}")
        self.shapes = stage_shapes(modules, input_shape(self.cfg))
        # Ring slots go to Redis from a thread: the stage reads its own slots from memory and
        # needs Redis only after a restart, so it need not wait for the write.
        self.writer = RingWriter(self.redis, depth=self.cfg.ring_size)
        rings = {name: RedisRing(self.redis, self.run, stage, name, self.cfg.ring_size,
                                 self.writer, self.cfg.ring_mirror_every) for name in ("out", "in")}
        method = methods.get(self.cfg.mode)
        synth = RemoteSynth(self._rpc, self.cfg, stage) if self.cfg.synth_placement == "remote" \
            and method.synthetic else None
        self.stage: Stage = method(self.cfg, stage, modules[stage - 1], self.shapes, rings,
                                   device, synth)
        self.span = span(modules[stage - 1])  # its units in the whole model, for failure lines
        self.failed: str | None = None  # why this stage cannot go on (zdni/failure.py)
        self.failed_sent = 0.0  # when the driver was last told
        self.backlog: deque[list[Any]] = deque()
        self.count = len(modules)
        self.inbox = Inbox(self.cfg, stage, self.count)
        wiring = method.wiring(stage, self.count)
        # An ordered run holds each event until its turn in the oracle's order (tests, --ordered).
        self.turns = Turns(Cursor(method.largest_window(self.cfg), wiring.batch_event,
                                  wiring.grad_event), self.cfg.epoch_batches or 1,
                           self.cfg.eval_every) if self.cfg.ordered else None
        self.carry_labels = method.labels_ride(self.cfg) and stage < self.count
        self.checkpoint_at: int | None = None  # asked for, waiting for the segment to end there
        # Synthesizer losses wait for the next 'update' DONE instead of a message of their own.
        self.held = Held()
        self.held_it = -1
        # A restarted worker goes on counting from where its predecessor's last beat left off.
        self.counts: Counter[str] = Counter({
            keys.text(k): int(v) for k, v in self.redis.hgetall(
                keys.counters(self.run, f"stage:{stage}")).items() if v.isdigit()})
        self.finished: OrderedDict[int, None] = OrderedDict()
        self.iteration = -1
        self.took = -1  # the latest iteration whose input this stage took
        self.stopper: Stopper | None = None
        self.driver_seen = False  # its driver has beaten once: from then on, silence ends it
        self.driver_missing_since = 0.0
        self.ended: str | None = None  # why serve() returned: stop, signal, or the run is over
        # How far from its own progress a legitimate iteration can be: the window in flight,
        # the ring, and the iterations a restarted worker's backup may lag behind the driver.
        self.horizon = 4 * self.cfg.inflight + self.cfg.ring_size + self.cfg.checkpoint_every
        fed = self.redis.hget(keys.state(self.run), "fed")  # where the driver is, for a restart
        self.driver_fed = int(fed) if fed is not None else 0
        self.resume()

    # -- lifecycle ------------------------------------------------------------------------
    def _wait_for_run(self, wait_s: float, served: frozenset[str]) -> str:
        """The current run once a driver has published it (not a start of it this process
        served: a run resumed with `--resume` is published again, and served again)."""
        deadline = time.monotonic() + wait_s
        watch = RedisWatch(self.who, float("inf"))  # waiting, a worker outlives any outage
        while time.monotonic() < deadline:
            current = watch.call(self.redis.get, keys.current_run())
            if current:
                state = watch.call(self.redis.hmget, keys.state(keys.text(current)),
                                   ["status", "started"]) or [None, None]
                self.attempt = attempt(keys.text(current), state[1])
                if state[0] in (b"starting", b"running") and self.attempt not in served:
                    return keys.text(current)
            time.sleep(0.2)
        raise SystemExit(f"{self.who} no run published in Redis within {wait_s:.0f} s")

    def run_over(self) -> str | None:
        """Why this run is over for us (its driver finished it, failed it, or stopped beating:
        abandoned), or None. Unknown while Redis is away: the run goes on."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(keys.state(self.run), "status")
        pipe.exists(keys.driver_beat(self.run))
        got = self.watch.call(pipe.execute)
        now = time.monotonic()
        if got is None:  # Redis away: its silence says nothing of the driver's
            self.driver_missing_since = now
            return None
        status, driver_alive = got
        if status in (b"finished", b"failed"):
            return keys.text(status)
        if driver_alive or not self.driver_seen:
            self.driver_seen = self.driver_seen or bool(driver_alive)
            self.driver_missing_since = now
        elif now - self.driver_missing_since > 5 * self.cfg.heartbeat_s:
            # Its beat expired (5 beats) and stayed away 5 more: not a Redis that came back
            # empty a moment ago, where the driver beats again within one health check.
            return "abandoned (its driver stopped beating)"
        return None

    def resume(self) -> None:
        """Start from the stage's latest backup when there is one (a restarted worker)."""
        found = checkpoint.load(self.redis, self.run, self.index)
        if found is not None:
            tensors, meta = found
            checkpoint.restore_stage(self.stage, tensors, meta)
            self.iteration = self.took = int(meta["it"])
            self.counts["resumed"] += 1
            if self.turns is not None:  # its order goes on after the backup's iteration
                self.turns.start_at(self.iteration + 1)
            log.warning("%s resumed from the backup of iteration %d", self.who, self.iteration)

    def serve(self) -> None:
        """Receive and apply messages until told to stop; always close sockets and beat 'stopped'."""
        ctx = zmq.Context()
        self.net = Endpoint(ctx, self.broker, self.index, self.curve)
        self.stopper = stopper = Stopper()
        log.info("%s serving run %s: mode %s, %s", self.who, self.run, self.cfg.mode,
                 self.stage.module)
        next_beat = 0.0
        try:
            while not stopper.stopping:
                now = time.monotonic()
                if now >= next_beat:
                    self._beat("alive")
                    next_beat = now + self.cfg.heartbeat_s
                    over = self.run_over()
                    if over is not None:
                        self.ended = f"run {self.run} {over}"
                        break
                frames = self.backlog.popleft() if self.backlog else self.net.recv(
                    timeout_ms=int(self.cfg.heartbeat_s * 1000))
                if frames is not None:
                    self.handle(frames)
        finally:
            self.writer.close()
            self._save(self.iteration)
            # The last beat waits out an outage (the driver reads its counters), unless Redis
            # being gone for good is why the stage stops; stopped by a signal (its driver
            # killed, and with it the embedded Redis, or an operator's kill), it waits
            # seconds, not the driver's 30: the process is asked to leave.
            self._beat("stopped", last=not isinstance(sys.exc_info()[1], RedisGone),
                       wait_s=SIGNALLED_LAST_BEAT_S if stopper.signalled else LAST_BEAT_S)
            self.net.close()
            ctx.term()

    # -- messages -------------------------------------------------------------------------
    def handle(self, frames: list[Any]) -> None:
        """Decode, check and apply one message; a bad one is logged, counted and dropped."""
        self.counts["received"] += 1
        start = time.perf_counter()
        try:
            msg = codec.decode(frames, expect_run=self.run, pin_memory=self.pin)
            self.counts["decode_us"] += int((time.perf_counter() - start) * 1e6)
            if msg.dst != self.index:
                raise MessageError("endpoint", f"message for endpoint {msg.dst} reached stage {self.index}")
            if msg.kind in EVENTS:  # user code runs: a failure ends the run (zdni/failure.py)
                self._refuse_after_failure(msg.it)
                with failure.guard(self.index, self.span, msg.it, EVENTS[msg.kind]):
                    self.dispatch(msg)
            else:
                self.dispatch(msg)
        except MessageError as exc:
            self._drop(exc.reason, str(exc))
        except StageError as exc:
            self._drop("unmatched", str(exc))
        except StageFailure as exc:
            self._fail(msg.it, str(exc))
        except Exception as exc:  # a message no check foresaw: keep serving, say so loudly
            log.exception("%s dropped a message that raised %r", self.who, exc)
            self.counts["dropped:internal"] += 1
        finally:  # busy / wall is the stage's utilization (scripts/bench_pipeline.py)
            self.counts["busy_us"] += int((time.perf_counter() - start) * 1e6)

    def _fail(self, it: int, text: str) -> None:
        """This stage cannot go on (its code raised, or produced non-finite values): say so
        once and tell the driver, which ends the run; a retry cannot fix it."""
        self.failed = text
        self.counts["failed"] += 1
        log.error("%s %s", self.who, text)
        self._tell_failure(it)

    def _tell_failure(self, it: int) -> None:
        assert self.failed is not None
        self.failed_sent = time.monotonic()
        self._send(protocol.FAIL, it, protocol.DRIVER, {},
                   {"error": self.failed[:failure.MAX_TEXT]})

    def _refuse_after_failure(self, it: int) -> None:
        """After a failure, training messages are dropped; the driver is told again (at most
        once a second) in case the first FAIL was lost on the way."""
        if self.failed is None:
            return
        if time.monotonic() - self.failed_sent > 1.0:
            self._tell_failure(it)
        raise MessageError("failed", f"iteration {it}: this stage has failed ({self.failed[:80]})")

    def _drop(self, reason: str, text: str) -> None:
        self.counts[f"dropped:{reason}"] += 1
        log.error("%s dropped a message (%s): %s", self.who, reason, text)

    def dispatch(self, msg: Message) -> None:
        kind, it, t = msg.kind, msg.it, msg.tensors
        if kind in (protocol.BATCH, protocol.ACT) and it in self.finished:
            raise MessageError("duplicate", f"iteration {it} was already trained")
        if kind in (protocol.BATCH, protocol.ACT, protocol.GRAD) and not (
                self.iteration - self.horizon <= it
                <= max(self.iteration, self.driver_fed) + self.horizon):
            raise MessageError("window", f"iteration {it} is outside {self.iteration} +- "
                                       f"{self.horizon}, the iterations this stage can be sent")
        if kind == protocol.BATCH:
            x = y = None
            if self.inbox.needs_x:
                x = check_tensor("x", t.get("x"), self.shapes[0], torch.float32)
            if self.inbox.needs_y:
                y = check_targets(t.get("y"), x.shape[0] if x is not None else None, self.cfg)
            self._run_events(it, self.inbox.add_batch(it, x, y))
        elif kind == protocol.ACT:
            h = check_tensor("h", t.get("h"), self.shapes[self.index - 1], torch.float32)
            y = check_targets(t.get("y"), h.shape[0], self.cfg) if self.inbox.act_labels \
                else None
            self._run_events(it, self.inbox.add_act(it, h, y))
        elif kind == protocol.GRAD:
            g = check_tensor("g", t.get("g"), self.shapes[self.index], torch.float32)
            if self.turns is not None:
                self.turns.add(("grad", it), g)
                self._run_due()
            else:
                self._train_grad(it, g)
        elif kind == protocol.EVAL:
            self._flush_held()
            self._evaluate(msg)
        elif kind == protocol.SYNTH_REP:
            metrics = {k: float(v) for k, v in msg.meta.items() if k.endswith("_loss") or k in (
                "grad_cos", "grad_err")}
            if metrics:  # what a training request sent without waiting measured
                self._apply(it, Outcome(metrics=metrics))
        elif kind == protocol.CONTROL:
            self._flush_held()
            self._control(msg)
        else:
            raise MessageError("kind", f"stage workers do not take {kind!r} messages")

    def _run_events(self, it: int, events: list[str]) -> None:
        for event in events:
            if self.turns is not None:
                self.turns.add((event, it))  # type: ignore[arg-type]
            else:
                self._run_event(event, it)
        if self.turns is not None:
            self._run_due()

    def _run_due(self) -> None:
        """An ordered run: apply the held events whose turn has come."""
        assert self.turns is not None
        for (kind, it), payload in self.turns.due():
            if kind == "grad":
                self._train_grad(it, payload)
            else:
                self._run_event(kind, it)
        self._checkpoint_if_finished()

    def _run_event(self, event: str, it: int) -> None:
        parts = self.inbox.peek(it)
        if event == "batch":
            assert parts.x is not None
            with failure.guard(self.index, self.span, it, event):  # its own iteration: an
                out = self.stage.train_batch(it, parts.x, parts.y)  # ordered run holds some
            self._apply(it, out)
            return
        true_input = parts.x if self.index == 1 else parts.h
        assert true_input is not None  # the inbox joined parts of one batch size
        self.inbox.take(it)
        self.took = max(self.took, it)
        y = parts.y if self.stage.needs_y else None
        with failure.guard(self.index, self.span, it, event):
            out = self.stage.train_input(it, true_input, y)
        self._apply(it, out, labels=parts.y)

    def _train_grad(self, it: int, g: torch.Tensor) -> None:
        with failure.guard(self.index, self.span, it, "grad"):
            out = self.stage.train_grad(it, g)
        # How late iteration it's true gradient came: the inputs this stage took past it.
        out.metrics["staleness"] = float(self.took - it)
        self._apply(it, out)
        self.counts["grads"] += 1

    def _apply(self, it: int, out: Outcome, labels: torch.Tensor | None = None) -> None:
        """Send what an event produced: the activation on (with the labels when they ride along,
        zdni.inbox), the gradient back, 'done' to the driver. Nothing non-finite leaves: the
        stage that made it fails, not the one downstream that would drop it."""
        failure.check(self.index, self.span, it, "train", out.h_out, out.d_in, out.metrics)
        if out.h_out is not None:
            tensors = {"h": out.h_out}
            if labels is not None and self.carry_labels:
                tensors["y"] = labels
            self._send(protocol.ACT, it, self.index + 1, tensors)
        if out.d_in is not None and self.index > 1:
            self._send(protocol.GRAD, it, self.index - 1, {"g": out.d_in})
        if out.done:
            self.finished[it] = None
            if len(self.finished) > RECENT:
                self.finished.popitem(last=False)
            self.iteration = max(self.iteration, it)
            self.counts["trained"] += 1
            every = self.cfg.checkpoint_every
            if every and it > 0 and it % every == 0:
                self._save(it)
        metrics: dict[str, Any] = {k: float(v) for k, v in out.metrics.items()}
        if out.done:  # the synthesizers' losses held since the last update ride along
            if metrics.keys() & self.held.names or \
                    self.held.entries() + len(metrics) >= MAX_META:
                self._flush_held()
            self._send(protocol.DONE, it, protocol.DRIVER, {}, {
                **self.held.meta(), **metrics, protocol.DONE_EVENT: protocol.EVENT_UPDATE})
            self.held.clear()
        elif metrics:  # a synthesizer trained (M on a true gradient, I on a true input)
            if not self.held.fits(metrics):
                self._flush_held()
            self.held.add(metrics)  # M trained again before an update: NAME/2, not a message
            self.held_it = it

    def _flush_held(self) -> None:
        """Report held synthesizer losses in a DONE of their own (before evaluating or
        stopping, or when no more fit in one message)."""
        if self.held:
            self._send(protocol.DONE, self.held_it, protocol.DRIVER, {},
                       {**self.held.meta(), protocol.DONE_EVENT: protocol.EVENT_SYNTH})
            self.held.clear()

    def _evaluate(self, msg: Message) -> None:
        h = check_tensor("h", msg.tensors.get("h"), self.shapes[self.index - 1], torch.float32)
        y = check_targets(msg.tensors.get("y"), h.shape[0], self.cfg)
        out = self.stage.evaluate(h)
        failure.check(self.index, self.span, msg.it, "eval", out, None, {})
        if self.index < self.count:
            self._send(protocol.EVAL, msg.it, self.index + 1, {"h": out, "y": y}, msg.meta)
            return
        meta = dict(msg.meta)
        assert self.stage.objective is not None  # the last stage's
        meta["loss_sum"], meta["metric_sum"] = self.stage.objective.score(out, y)
        meta["n"] = int(y.shape[0])
        self._send(protocol.EVAL_RESULT, msg.it, protocol.DRIVER, {}, meta)

    def _control(self, msg: Message) -> None:
        op = msg.meta.get("op")
        if op not in protocol.CONTROL_OPS:
            raise MessageError("value", f"unknown control op {op!r:.40}; expected one of "
                                        f"{sorted(protocol.CONTROL_OPS)}")
        if op == protocol.OP_STOP:
            if self.stopper is not None:
                self.stopper.stop()
        elif op == protocol.OP_CHECKPOINT:  # meta "at": save under that label (a snapshot), else now
            at = msg.meta.get("at")
            label = at if isinstance(at, int) and at >= 0 else self.iteration
            self.checkpoint_at = label
            if self.turns is not None:  # an ordered run: the checkpoint drains, as in process
                self.turns.end_at(label + 1)
                self._run_due()
            self._checkpoint_if_finished()
        elif op == protocol.OP_ROLLBACK:
            target = msg.meta.get("to")
            found = checkpoint.load(self.redis, self.run, self.index, int(target)) if isinstance(
                target, int) else None
            if found is None:
                raise MessageError("value", f"no backup of stage {self.index} at iteration {target}")
            checkpoint.restore_stage(self.stage, *found)
            self.iteration = self.took = int(found[1]["it"])
            self.finished.clear()
            fed = self.redis.hget(keys.state(self.run), "fed")
            self.driver_fed = int(fed) if fed is not None else self.driver_fed
            self.redis.hset(keys.heartbeat(self.run, self.index), "rolled_back_to", self.iteration)
            log.warning("%s rolled back to iteration %d", self.who, self.iteration)

    def _checkpoint_if_finished(self) -> None:
        """Back up at the label asked for once every event up to it has run (an ordered run's
        last gradients may still be on their way), then tell the driver."""
        label = self.checkpoint_at
        if label is None or (self.turns is not None and not self.turns.finished(label)):
            return
        self.checkpoint_at = None
        self._save(label)
        # The driver's checkpoint waits for every stage to say it backed up at `label`.
        self.watch.call(self.redis.hset, keys.heartbeat(self.run, self.index), "checkpointed",
                        label)

    def _rpc(self, op: str, it: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
             wait: bool) -> Message | None:
        """Ask the synthesizer service; when waiting, hold other messages in the backlog."""
        self._send(protocol.SYNTH_REQ, it, protocol.SYNTH, tensors, {"op": op, **meta})
        if not wait:
            return None
        deadline = time.monotonic() + RPC_TIMEOUT_S
        resend = time.monotonic() + RPC_RESEND_S
        while (left := deadline - time.monotonic()) > 0:
            if time.monotonic() >= resend:  # answering twice is harmless: predictions only
                self.counts["rpc_resent"] += 1
                self._send(protocol.SYNTH_REQ, it, protocol.SYNTH, tensors, {"op": op, **meta})
                resend = time.monotonic() + RPC_RESEND_S
            frames = self.net.recv(int(min(left, max(resend - time.monotonic(), 0.01)) * 1000))
            if frames is None:
                continue
            try:
                header = codec.decode_header(frames)
            except MessageError:
                header = {}
            if (header.get("kind") == protocol.SYNTH_REP and header.get("it") == it
                    and header.get("meta", {}).get("op") == op):
                return codec.decode(frames, expect_run=self.run, pin_memory=self.pin)
            if len(self.backlog) >= BACKLOG:
                self._drop("backlog_full", f"{len(self.backlog)} messages held during an RPC")
            else:
                self.backlog.append(frames)
        raise StageError(f"synthesizer service did not answer {op} of iteration {it}"
                         f" within {RPC_TIMEOUT_S:.0f} s")

    def _send(self, kind: str, it: int, dst: int, tensors: dict[str, torch.Tensor],
              meta: dict[str, Any] | None = None) -> None:
        start = time.perf_counter()
        if self.pin:  # GPU tensors reach the wire through pinned host buffers
            tensors = to_host(tensors)
        self.net.send(codec.encode(Message(kind, self.run, it, self.index, dst, tensors,
                                           meta or {})))
        self.counts["send_us"] += int((time.perf_counter() - start) * 1e6)

    def _save(self, it: int) -> None:
        """Back up the stage (skipped while Redis is away: the next interval's backup comes)."""
        if it >= 0:
            self.watch.call(checkpoint.save, self.redis, self.run, self.stage, it,
                            self.checkpoint_dir)

    def _beat(self, status: str, last: bool = False, wait_s: float = 0.0) -> None:
        if last:  # a last word: waits up to wait_s seconds for Redis (RedisWatch.settle)
            self.watch.settle(beat, self.redis, self.run, self.index, status, self.iteration,
                              self.counts, self.device, self.cfg.heartbeat_s,
                              self.checkpoint_dir, wait_s=wait_s)
        else:
            self.watch.call(beat, self.redis, self.run, self.index, status, self.iteration,
                            self.counts, self.device, self.cfg.heartbeat_s, self.checkpoint_dir)


def main(stage: int, broker: str, redis_url: str, run: str | None, device: str,
         threads: int | None, checkpoint_dir: str | None, wait_s: float = 60.0,
         curve: Curve | None = None, allow_model: str | None = None, once: bool = False,
         allow_code: frozenset[str] = frozenset()) -> None:
    """Entry point of `zdni worker`: serve the named run, or (as rq's workers serve job after
    job) the current run, then the next one, until SIGTERM or, with `once`, one run."""
    setup_logging(f"[stage {stage}]")
    served: set[str] = set()
    while True:
        # Between runs (waiting for one, building its stage) SIGTERM simply ends the process;
        # serve() installs the two-stage stop while a run is being served.
        signal.signal(signal.SIGTERM, _leave)
        worker = Worker(stage, broker, redis_url, run, device, threads, checkpoint_dir, wait_s,
                        curve, allow_model, frozenset(served), allow_code)
        worker.serve()
        served.add(worker.attempt)
        if once or run is not None or (worker.stopper is not None and worker.stopper.signalled):
            return
        log.warning("[stage %d] %s; waiting for the next run", stage,
                    worker.ended or f"run {worker.run} stopped")
        wait_s = float("inf")  # a server: it waits for runs as long as it is left running


def attempt(run: str, started: object) -> str:
    """One start of a run: its id and when its driver published it."""
    return f"{run}@{keys.text(started) if started is not None else ''}"


def _leave(signum: int, frame: Any) -> None:
    raise SystemExit(0)
