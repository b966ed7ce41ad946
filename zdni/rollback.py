"""Rolling every stage of a run back to one backed-up iteration, through the broker."""

from __future__ import annotations

import time

import redis
import zmq

from zdni import checkpoint, codec, keys, protocol
from zdni.config import RunConfig
from zdni.errors import ZdniError
from zdni.models import stage_count
from zdni.security import Curve
from zdni.transport import make_socket


class RollbackError(ZdniError, RuntimeError):
    """No common backup, or the stages did not confirm."""


def common_iteration(backups: dict[int, list[int]], target: int) -> int:
    """The newest iteration <= target at which every stage has a backup (pure)."""
    shared = set.intersection(*(set(v) for v in backups.values())) if backups else set()
    eligible = [it for it in shared if it <= target]
    if not eligible:
        raise RollbackError(f"no iteration <= {target} has a backup of every stage; backups:"
                            f" {dict(sorted(backups.items()))}")
    return max(eligible)


def rollback_run(client: redis.Redis, broker: str, run: str, target: int,
                 timeout_s: float = 30.0, curve: Curve | None = None) -> int:
    """Send every stage a rollback to the chosen iteration and wait for their heartbeats to show it."""
    raw = client.get(keys.config(run))
    if raw is None:
        raise RollbackError(f"no run {run!r} in Redis")
    stages = int(client.hget(keys.state(run), "stages") or 0) or stage_count(
        RunConfig.from_json(raw))
    chosen = common_iteration(
        {s: checkpoint.iterations(client, run, s) for s in range(1, stages + 1)}, target)
    ctx = zmq.Context()
    push = make_socket(ctx, zmq.PUSH, curve=curve)
    try:
        push.connect(broker)
        for stage in range(1, stages + 1):
            msg = codec.Message(protocol.CONTROL, run, chosen, protocol.DRIVER, stage, {},
                                {"op": protocol.OP_ROLLBACK, "to": chosen})
            if not push.poll(int(timeout_s * 1000), zmq.POLLOUT):
                raise RollbackError(f"broker {broker} did not take the rollback message")
            push.send_multipart(codec.encode(msg), copy=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = [client.hget(keys.heartbeat(run, s), "rolled_back_to") for s in
                    range(1, stages + 1)]
            if all(v is not None and int(v) == chosen for v in done):
                return chosen
            time.sleep(0.1)
        raise RollbackError(f"stages did not confirm the rollback to {chosen} in {timeout_s:.0f} s")
    finally:
        push.close(0)
        ctx.term()
