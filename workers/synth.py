"""The synthesizer service process (--synth-placement remote): answers every stage's M and I requests."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import zmq

from zdni import checkpoint, codec, protocol
from zdni.buffer import RedisRing
from zdni.health import beat
from zdni.models import build_stages, input_shape, stage_shapes
from zdni.outage import RedisWatch
from zdni.protocol import MessageError
from zdni.redisserver import connect
from zdni.rng import span
from zdni.security import Curve
from zdni.shell import Stopper, read_config, setup_logging
from zdni.stage import StageError
from zdni.synthservice import SynthService
from zdni.transport import Endpoint
from zdni.usercode import check_allowed

log = logging.getLogger("zdni.synth")


def serve(broker: str, redis_url: str, run: str, curve: Curve | None = None,
          allow_model: str | None = None) -> None:
    """Answer requests until SIGTERM; beat as endpoint SYNTH."""
    client = connect(redis_url, fail_fast=True)
    cfg = read_config(client, run, "[synth]")
    watch = RedisWatch("[synth]", cfg.redis_timeout_s)
    check_allowed(cfg.model, allow_model, "[synth]")  # before any user code is imported
    modules = build_stages(cfg)
    shapes = stage_shapes(modules, input_shape(cfg))
    service = SynthService(cfg, shapes, lambda stage, name: RedisRing(
        client, run, stage, name, cfg.ring_size, mirror_every=cfg.ring_mirror_every),
        [span(m) for m in modules])
    counts: Counter[str] = Counter()
    trained = -1  # the newest iteration a synthesizer trained on
    found = checkpoint.load(client, run, protocol.SYNTH)
    if found is not None:  # a restarted service: resume from its latest backup
        service.restore(*found)
        trained = int(found[1]["it"])
        counts["resumed"] += 1
        log.warning("[synth] resumed from the backup of iteration %d", trained)
    every = cfg.checkpoint_every
    next_save = (trained // every + 1) * every if every else 0
    stopper = Stopper()
    ctx = zmq.Context()
    net = Endpoint(ctx, broker, protocol.SYNTH, curve)
    log.info("[synth] serving run %s for stages %s", run, sorted(service.synths))
    next_beat = 0.0
    try:
        while not stopper.stopping:
            if time.monotonic() >= next_beat:
                watch.call(beat, client, run, protocol.SYNTH, "alive", -1, counts, "cpu",
                           cfg.heartbeat_s)
                next_beat = time.monotonic() + cfg.heartbeat_s
            frames = net.recv(int(cfg.heartbeat_s * 1000))
            if frames is None:
                continue
            counts["received"] += 1
            try:
                msg = codec.decode(frames, expect_run=run)
                if msg.kind != protocol.SYNTH_REQ:
                    raise MessageError("kind", f"the synthesizer takes synth_req, not {msg.kind!r}")
                net.send(codec.encode(service.handle(msg)))
                counts["answered"] += 1
                if msg.meta.get("op") in (protocol.SYNTH_TRAIN_GRAD, protocol.SYNTH_TRAIN_INPUT):
                    trained = max(trained, msg.it)
                    if every and trained >= next_save:
                        watch.call(checkpoint.save_state, client, run, protocol.SYNTH, trained,
                                   *service.state(trained))
                        next_save = (trained // every + 1) * every
            except MessageError as exc:
                _drop(counts, exc.reason, str(exc))
            except StageError as exc:
                _drop(counts, "unmatched", str(exc))
    finally:
        if trained >= 0:
            watch.call(checkpoint.save_state, client, run, protocol.SYNTH, trained,
                       *service.state(trained))
        watch.call(beat, client, run, protocol.SYNTH, "stopped", -1, counts, "cpu",
                   cfg.heartbeat_s)
        net.close()
        ctx.term()


def _drop(counts: Counter[str], reason: str, text: Any) -> None:
    counts[f"dropped:{reason}"] += 1
    log.error("[synth] dropped a request (%s): %s", reason, text)


def main(broker: str, redis_url: str, run: str, curve: Curve | None = None,
         allow_model: str | None = None) -> None:
    """Entry point of `zdni synth`."""
    setup_logging("[synth]")
    serve(broker, redis_url, run, curve, allow_model)
