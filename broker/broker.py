"""The broker process: routes frames between driver and stages, and monitors worker health.

One PULL socket takes every message in; one PUSH socket per endpoint sends it on (addresses in
zdni.protocol.outbound_address). The broker reads only headers (zdni.header.decode_header) and
forwards the tensor frames untouched, without copying; it never imports torch. It never stops reading: the driver's
window bounds the messages in flight, and a message that cannot be sent waits in a bounded
per-endpoint queue; past that bound it is dropped and counted, so a flood cannot grow memory
and backpressure cannot deadlock the pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import Counter, deque
from typing import Any

import msgpack
import redis
import zmq

from zdni import health, keys, protocol
from zdni.config import ConfigError, RunConfig
from zdni.header import decode_header
from zdni.outage import TRANSIENT, RedisWatch
from zdni.protocol import MessageError
from zdni.redisserver import connect
from zdni.security import Curve
from zdni.shell import Stopper, setup_logging
from zdni.transport import NOBLOCK, POLLIN, BindError, bind, make_socket, recv_frames, send_frames

log = logging.getLogger("zdni.broker")
QUEUE_LIMIT = 4096  # messages waiting per endpoint; the window keeps real traffic far below


class Broker:
    """Routing loop and health monitor over real sockets and a real Redis."""

    def __init__(self, bind: str, redis_url: str, curve: Curve | None = None) -> None:
        self.bind = bind
        self.curve = curve
        self.redis = connect(redis_url, fail_fast=True)
        self.runs: dict[str, int] = {}  # run id -> stage count, read from the run's config
        self.liveness: dict[tuple[str, int], health.Liveness] = {}
        self.counts: Counter[str] = Counter()
        self.instance = uuid.uuid4().hex[:12]  # this process's id, in every ping it routes
        # Routing needs no Redis: the broker routes on through any outage, however long.
        self.watch = RedisWatch("[broker]", float("inf"))
        self.waiting: set[int] = set()  # endpoints whose queue holds messages (serve)

    def stages_of(self, run: str) -> int:
        """The run's stage count, as its driver published it; raises MessageError('run') for a
        run Redis does not know."""
        if run not in self.runs:
            try:
                raw = self.redis.hget(keys.state(run), "stages")
            except TRANSIENT:
                raise MessageError("redis", f"run {run!r} unknown here and Redis is away") from None
            if raw is None:
                raise MessageError("run", f"unknown run id {run!r}: no state in Redis")
            stages = int(raw) if raw.isdigit() else 0
            if not 1 <= stages <= protocol.MAX_STAGES:
                raise MessageError("run", f"run {run!r} has a bad stage count {raw!r:.20}")
            self.runs[run] = stages
        return self.runs[run]

    def serve(self) -> None:
        ctx = zmq.Context()
        auth = self.curve.authenticator(ctx) if self.curve else None
        inbound = make_socket(ctx, zmq.PULL, curve=self.curve)
        outs = [make_socket(ctx, zmq.PUSH, curve=self.curve) for _ in range(protocol.ENDPOINTS)]
        try:
            self._bind(inbound, outs)
        except BaseException:
            for sock in [inbound, *outs]:
                sock.close(0)
            if auth is not None:
                auth.stop()
            ctx.term()
            raise
        queues: list[deque[list[Any]]] = [deque() for _ in outs]
        stopper = Stopper()
        log.info("[broker] listening on %s (outbound ports follow it)", self.bind)
        poller = zmq.Poller()
        poller.register(inbound, zmq.POLLIN)
        interval = 1.0
        next_check = time.monotonic() + interval
        try:
            while not stopper.stopping:
                waiting = list(self.waiting)
                for e in waiting:
                    poller.register(outs[e], zmq.POLLOUT)
                events = dict(poller.poll(timeout=100))
                for e in waiting:
                    poller.unregister(outs[e])
                    if events.get(outs[e]):
                        self._flush(e, outs[e], queues[e])
                # A burst at a time, then service queues and the monitor; EVENTS says whether
                # another message is there (cheaper than a receive that raises zmq.Again), but
                # it may say so when none is (seen over CURVE): then the receive raises Again.
                for _ in range(256):
                    if not int(inbound.getsockopt(zmq.EVENTS)) & POLLIN:
                        break
                    try:
                        frames = recv_frames(inbound, NOBLOCK)
                    except zmq.Again:
                        break
                    self.forward(frames, outs, queues)
                if time.monotonic() >= next_check:
                    try:
                        interval = self.watch.call(self.monitor, default=1.0) or 1.0
                    except redis.RedisError as exc:  # refused, not lost: keep routing
                        log.error("[broker] health check skipped: %s", exc)
                        interval = 1.0
                    next_check = time.monotonic() + interval
        finally:
            with contextlib.suppress(redis.RedisError):  # Redis may already be gone at shutdown
                self._flush_counts()
            for sock in [inbound, *outs]:
                sock.close(0)
            if auth is not None:
                auth.stop()
            ctx.term()
            log.info("[broker] stopped")

    def _bind(self, inbound: zmq.Socket, outs: list[zmq.Socket]) -> None:
        """Bind the inbound address and the outbound ones derived from it; a port that cannot
        be bound is a BindError naming it and the range the broker needs."""
        hint = (f"; the broker binds {self.bind} and the {protocol.ENDPOINTS} outbound "
                f"addresses after it: give --bind a port with {protocol.ENDPOINTS} free ports "
                f"after it")
        try:
            bind(inbound, self.bind, "the inbound address, --bind")
            for endpoint, sock in enumerate(outs):
                bind(sock, protocol.outbound_address(self.bind, endpoint),
                     f"the outbound address of endpoint {endpoint}, derived from --bind")
        except BindError as exc:
            raise BindError(f"{exc}{hint}") from None

    def forward(self, frames: list[Any], outs: list[zmq.Socket],
                queues: list[deque[list[Any]]]) -> None:
        """Route one message, or log, count and drop it."""
        self.counts["received"] += 1
        try:
            header = decode_header(frames)
            dst = protocol.route(header["kind"], header["src"], header["dst"],
                                 self.stages_of(header["run"]))
        except MessageError as exc:
            self._drop(exc.reason, str(exc))
            return
        except ValueError as exc:
            self._drop("route", str(exc))
            return
        if header["kind"] == protocol.PING:
            self.counts["pings"] += 1  # liveness traffic, counted apart from the run's messages
            # Answer with who we are: a sender that sees a new id knows we restarted and lost
            # what the old broker held, however short the outage (zdni/driver.py _pong)
            header["meta"]["broker"] = self.instance
            frames = [msgpack.packb(header), *frames[1:]]
        queue = queues[dst]
        if not queue:
            try:
                send_frames(outs[dst], frames, NOBLOCK)
                self.counts["forwarded"] += 1
                return
            except zmq.Again:
                pass
        if len(queue) >= QUEUE_LIMIT:
            self._drop("queue_full", f"endpoint {dst} has {len(queue)} messages waiting")
            return
        queue.append(frames)
        self.waiting.add(dst)

    def _flush(self, endpoint: int, sock: zmq.Socket, queue: deque[list[Any]]) -> None:
        while queue:
            try:
                send_frames(sock, queue[0], NOBLOCK)
            except zmq.Again:
                return
            queue.popleft()
            self.counts["forwarded"] += 1
        self.waiting.discard(endpoint)

    def _drop(self, reason: str, text: str) -> None:
        self.counts[f"dropped:{reason}"] += 1
        if self.counts[f"dropped:{reason}"] <= 100 or self.counts[f"dropped:{reason}"] % 1000 == 0:
            log.error("[broker] dropped a message (%s): %s", reason, text)

    def monitor(self) -> float:
        """One health check of the current run's stages; returns the interval until the next."""
        current = self.redis.get(keys.current_run())
        if current is None:
            return 1.0
        run = keys.text(current)
        raw = self.redis.get(keys.config(run))
        if raw is None:
            return 1.0
        try:
            cfg = RunConfig.from_json(raw)
            stages = self.stages_of(run)
        except (ConfigError, MessageError) as exc:
            log.error("[broker] run %s cannot be monitored: %s", run, exc)
            return 1.0
        pipe = self.redis.pipeline(transaction=False)
        for stage in range(1, stages + 1):
            pipe.hmget(keys.heartbeat(run, stage), ["time", "status"])
        beats = pipe.execute()
        self.counts["health_checks"] += 1  # events name the check that saw them
        for stage, (beat_time, status) in zip(range(1, stages + 1), beats):
            previous = self.liveness.get((run, stage), health.Liveness(state="starting"))
            stopped = status == b"stopped"
            now = health.check(previous, float(beat_time) if beat_time else None, stopped)
            if previous.state == "starting" and now.state == "failed" and previous.last_beat is None:
                now.state = "starting"  # never beat yet: still starting, not failed
            self.liveness[(run, stage)] = now
            if now.state != previous.state:
                self.redis.hset(keys.health(run), str(stage), now.state)
                health.publish(self.redis, run, {"stage": stage, "state": now.state,
                                                 "time": time.time(),
                                                 "check": self.counts["health_checks"]})
                level = logging.ERROR if now.state == "failed" else logging.INFO
                log.log(level, "[broker] stage %d of run %s is %s", stage, run, now.state)
        self._flush_counts(run)
        return cfg.heartbeat_s

    def _flush_counts(self, run: str | None = None) -> None:
        if run is None:
            current = self.redis.get(keys.current_run())
            run = keys.text(current) if current else None
        if run and self.counts:
            self.redis.hset(keys.counters(run, "broker"), mapping=dict(self.counts))  # type: ignore[arg-type]


def main(bind: str, redis_url: str, curve: Curve | None = None) -> None:
    """Entry point of `zdni broker`."""
    setup_logging("[broker]")
    if curve is None and not bind.startswith(("tcp://127.", "tcp://localhost", "ipc://")):
        log.warning("[broker] %s is reachable from other hosts without encryption or "
                    "authentication; use --curve-dir (see `zdni keys`)", bind)
    Broker(bind, redis_url, curve).serve()
