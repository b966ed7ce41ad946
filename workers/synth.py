"""The synthesizer service process (--synth-placement remote): answers every stage's M and I requests."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from typing import Any

import zmq

from zdni import checkpoint, codec, keys, protocol
from zdni.buffer import RedisRing
from zdni.codec import DecodeError
from zdni.config import RunConfig
from zdni.health import beat
from zdni.inbox import InputError
from zdni.models import INPUT_SHAPES, build_stages, stage_shapes
from zdni.redisserver import connect
from zdni.stage import StageError
from zdni.synthservice import SynthService
from zdni.transport import Endpoint

log = logging.getLogger("zdni.synth")


def serve(broker: str, redis_url: str, run: str) -> None:
    """Answer requests until SIGTERM; beat as endpoint SYNTH."""
    client = connect(redis_url)
    raw = client.get(keys.config(run))
    if raw is None:
        raise SystemExit(f"[synth] run {run!r} has no config in Redis")
    cfg = RunConfig.from_json(raw)
    shapes = stage_shapes(build_stages(cfg), INPUT_SHAPES[cfg.dataset])
    service = SynthService(cfg, shapes, lambda stage, name: RedisRing(
        client, run, stage, name, cfg.ring_size))
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
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    ctx = zmq.Context()
    net = Endpoint(ctx, broker, protocol.SYNTH)
    log.info("[synth] serving run %s for stages %s", run, sorted(service.synths))
    next_beat = 0.0
    try:
        while not stopping:
            if time.monotonic() >= next_beat:
                beat(client, run, protocol.SYNTH, "alive", -1, counts, "cpu", cfg.heartbeat_s)
                next_beat = time.monotonic() + cfg.heartbeat_s
            frames = net.recv(int(cfg.heartbeat_s * 1000))
            if frames is None:
                continue
            counts["received"] += 1
            try:
                msg = codec.decode(frames, expect_run=run)
                if msg.kind != protocol.SYNTH_REQ:
                    raise InputError("kind", f"the synthesizer takes synth_req, not {msg.kind!r}")
                net.send(service.handle(msg))
                counts["answered"] += 1
                if msg.meta.get("op") in ("train_grad", "train_input"):
                    trained = max(trained, msg.it)
                    if every and trained >= next_save:
                        checkpoint.save_state(client, run, protocol.SYNTH, trained,
                                              *service.state(trained))
                        next_save = (trained // every + 1) * every
            except (DecodeError, InputError) as exc:
                _drop(counts, exc.reason, str(exc))
            except StageError as exc:
                _drop(counts, "unmatched", str(exc))
    finally:
        if trained >= 0:
            checkpoint.save_state(client, run, protocol.SYNTH, trained, *service.state(trained))
        beat(client, run, protocol.SYNTH, "stopped", -1, counts, "cpu", cfg.heartbeat_s)
        net.close()
        ctx.term()


def _drop(counts: Counter[str], reason: str, text: Any) -> None:
    counts[f"dropped:{reason}"] += 1
    log.error("[synth] dropped a request (%s): %s", reason, text)


def main(broker: str, redis_url: str, run: str) -> None:
    """Entry point of `zdni synth`."""
    logging.basicConfig(level=os.environ.get("ZDNI_LOG", "INFO"), force=True,
                        format="%(asctime)s [synth] %(levelname)s %(message)s")
    serve(broker, redis_url, run)
