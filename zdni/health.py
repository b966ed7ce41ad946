"""Worker heartbeats with utilization, and the pure rule that turns missed beats into 'failed'.

A heartbeat is a Redis hash that expires after a few intervals, so a missing key is a dead
worker even if nobody is watching. The broker's monitor checks every interval: a stage whose
beat has not changed for two consecutive checks is marked failed; a new beat makes it alive.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

from zdni import keys
from zdni.usage import utilization


def beat(client: redis.Redis, run: str, stage: int, status: str, iteration: int,
         counts: Mapping[str, int], device: str, interval: float = 1.0,
         disk_path: str | None = None) -> None:
    """Write the stage's heartbeat (expiring after 5 intervals) and its counters, in one trip.

    The beat carries zdni.usage.utilization: CPU, memory, the disk of `disk_path` (the worker's
    checkpoint directory; default its working directory) and, on CUDA, the GPU's figures.
    """
    fields: dict[str, Any] = {
        "status": status, "time": time.time(), "iteration": iteration, "pid": os.getpid(),
        "host": socket.gethostname(), "device": device, **utilization(device, disk_path),
        "cores": ",".join(map(str, sorted(os.sched_getaffinity(0)))) if hasattr(
            os, "sched_getaffinity") else "",
    }
    pipe = client.pipeline(transaction=False)
    key = keys.heartbeat(run, stage)
    pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
    if status == "stopped":  # the last word stays: `zdni status` shows where the stage ended
        pipe.persist(key)
    else:
        pipe.expire(key, max(int(interval * 5), 2))
    if counts:
        pipe.hset(keys.counters(run, f"stage:{stage}"), mapping=dict(counts))  # type: ignore[arg-type]
    pipe.execute()


@dataclass
class Liveness:
    """What the monitor remembers of one stage between checks."""

    last_beat: float | None = None
    misses: int = 0
    state: str = "alive"


def check(previous: Liveness, beat_time: float | None, stopped: bool = False) -> Liveness:
    """The stage's liveness after one check, given the beat time now in Redis (None: no key).

    Two consecutive checks without a new beat make a stage failed; a new beat makes it alive.
    A stage that said it stopped is 'stopped', never failed.
    """
    if stopped:
        return Liveness(beat_time, 0, "stopped")
    if beat_time is not None and beat_time != previous.last_beat:
        return Liveness(beat_time, 0, "alive")
    if previous.state == "stopped":  # its heartbeat key expires after it stops: not a failure
        return Liveness(previous.last_beat, 0, "stopped")
    misses = previous.misses + 1
    return Liveness(previous.last_beat, misses, "failed" if misses >= 2 else previous.state)


EVENT_LOG_MAXLEN = 1000  # events kept per run (approximate trimming): a run has few


def publish(client: redis.Redis, run: str, event: dict[str, Any]) -> None:
    """Announce a notable event on the run's channel, and keep it in the run's event log (a
    stream, so that a dashboard started later, or polling, still sees it)."""
    text = json.dumps(event)
    pipe = client.pipeline(transaction=False)
    pipe.publish(keys.events(run), text)
    pipe.xadd(keys.event_log(run), {"json": text}, maxlen=EVENT_LOG_MAXLEN, approximate=True)
    pipe.execute()
