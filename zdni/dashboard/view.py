"""What the dashboard's JSON API answers: runs, a run's settings and state, its stages' health and
utilization, counters, backups, metric records and events, read from Redis as it is now.

Every function takes a Redis client and returns plain JSON-able data; an unknown run raises
RunNotFound and a Redis failure passes through as redis.RedisError (the app turns both into
HTTP errors). Nothing here writes.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import redis

from zdni import keys, protocol

__all__ = ["BadParameter", "RunNotFound", "backups", "counters", "events", "metrics", "run", "runs", "stage_state",
           "stages"]

OVER = ("finished", "failed", "stopped")  # a run in these states has no live stage
STREAM_ID = re.compile(r"^(0|\d{1,20}-\d{1,20})\Z")
RECENT_ITERS = 50  # records searched back for the newest iter record (evals and epochs between)
# Heartbeat fields as numbers; a field the beat lacks (no GPU: every gpu_*) stays absent.
NUMBERS = ("cpu_percent", "rss_mb", "disk_total_gb", "disk_free_gb", "disk_used_percent",
           "gpu_mem_mb", "gpu_util_percent", "gpu_mem_used_mb", "gpu_mem_total_mb")


class RunNotFound(LookupError):
    """No run of that id in this Redis; the message names the runs it has."""


class BadParameter(ValueError):
    """A query parameter that cannot be used; the message says what was expected."""


def _hash(client: redis.Redis, key: str) -> dict[str, str]:
    return {keys.text(k): keys.text(v) for k, v in client.hgetall(key).items()}


def _config(client: redis.Redis, run_id: str) -> dict[str, Any]:
    raw = client.get(keys.config(run_id))
    if raw is None:
        known = [keys.text(r) for r in client.zrevrange(keys.runs(), 0, 4)]
        raise RunNotFound(f"no run {run_id!r} in this Redis (newest: {known})")
    return dict(json.loads(raw))


def _state(client: redis.Redis, run_id: str) -> dict[str, Any]:
    """The run's state hash, numbers as numbers."""
    out: dict[str, Any] = {}
    for k, v in _hash(client, keys.state(run_id)).items():
        out[k] = _number(v) if k != "broker" and k != "status" else v
    return out


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def runs(client: redis.Redis, limit: int = 100) -> dict[str, Any]:
    """The runs in this Redis, newest first: id, label, mode, model, status, progress."""
    current = client.get(keys.current_run())
    out = []
    listed: Any = client.zrevrange(keys.runs(), 0, limit - 1, withscores=True)
    for raw, started in listed:
        run_id = keys.text(raw)
        pipe = client.pipeline(transaction=False)
        pipe.get(keys.config(run_id))
        pipe.hgetall(keys.state(run_id))
        cfg_raw, state_raw = pipe.execute()
        cfg = json.loads(cfg_raw) if cfg_raw else {}
        state = {keys.text(k): keys.text(v) for k, v in state_raw.items()}
        out.append({
            "run": run_id, "started": started, "label": cfg.get("label") or "",
            "mode": cfg.get("mode"), "conditioned": cfg.get("conditioned"),
            "model": cfg.get("model"), "dataset": cfg.get("dataset"),
            "status": state.get("status", "unknown"), "stages": _number(state.get("stages", "0")),
            "epoch": _number(state.get("epoch", "0")), "fed": _number(state.get("fed", "0")),
            "test_accuracy": _number(state["test_accuracy"]) if "test_accuracy" in state
            else None})
    return {"runs": out, "current": keys.text(current) if current else None}


def run(client: redis.Redis, run_id: str) -> dict[str, Any]:
    """A run's settings (as published) and state (status, stages, fed, epoch, accuracy...)."""
    cfg = _config(client, run_id)
    return {"run": run_id, "config": cfg, "state": _state(client, run_id)}


def stage_state(run_over: bool, monitor: str | None, beat_status: str | None,
                age_s: float | None, interval_s: float) -> str:
    """What the dashboard calls a stage (pure): stopped, failed, restarting, starting, missing,
    suspect (alive to the broker's monitor but silent for more than 1.5 heartbeats: a miss the
    monitor will call failed at the second) or alive."""
    if run_over or beat_status == "stopped":
        return "stopped"
    if monitor in ("failed", "restarting"):
        return monitor
    if beat_status is None:  # no heartbeat key: never beat, or it expired (5 intervals)
        return "starting" if monitor in (None, "starting") else "failed"
    if age_s is not None and age_s > 1.5 * interval_s:
        return "suspect"
    return "alive"


def stages(client: redis.Redis, run_id: str) -> dict[str, Any]:
    """Each stage's state, heartbeat (age, iteration, CPU, memory, disk, GPU), counters and its
    newest per-stage metrics (lag, staleness, M's and I's losses, and any other)."""
    cfg = _config(client, run_id)
    state = _state(client, run_id)
    count = int(state.get("stages") or 0)
    interval = float(cfg.get("heartbeat_s", 1.0))
    over = state.get("status") in OVER
    health = _hash(client, keys.health(run_id))
    latest = _latest_iter(client, run_id)
    now = time.time()
    rows = []
    for stage in [*range(1, count + 1), protocol.SYNTH]:
        beat = _hash(client, keys.heartbeat(run_id, stage))
        if stage == protocol.SYNTH and not beat:
            continue
        counts = {k: int(v) for k, v in _hash(client, keys.counters(run_id, f"stage:{stage}"))
                  .items() if v.lstrip("-").isdigit()}
        age = round(now - float(beat["time"]), 2) if "time" in beat else None
        name = "synth" if stage == protocol.SYNTH else stage
        row: dict[str, Any] = {
            "stage": name,
            "state": stage_state(over, health.get(str(stage)), beat.get("status"), age, interval),
            "monitor": health.get(str(stage)), "beat": beat.get("status"),
            "iteration": int(beat.get("iteration", -1)), "heartbeat_age_s": age,
            "pid": _number(beat["pid"]) if "pid" in beat else None, "host": beat.get("host"),
            "device": beat.get("device"), "disk_path": beat.get("disk_path"),
            "gpu_name": beat.get("gpu_name"),
            "rolled_back_to": int(beat["rolled_back_to"]) if "rolled_back_to" in beat else None,
            "trained": counts.get("trained", 0), "received": counts.get("received", 0),
            "resumed": counts.get("resumed", 0),
            "dropped": sum(v for k, v in counts.items() if k.startswith("dropped:")),
            "metrics": {field: value[str(stage)] for field, value in latest.items()
                        if isinstance(value, dict) and str(stage) in value},
        }
        row.update({k: float(beat[k]) for k in NUMBERS if k in beat})
        rows.append(row)
    return {"run": run_id, "status": state.get("status"), "heartbeat_s": interval,
            "fed": state.get("fed"), "stages": rows,
            "inflight": latest.get("inflight"), "at_iteration": latest.get("iteration")}


def _latest_iter(client: redis.Redis, run_id: str) -> dict[str, Any]:
    recent: Any = client.xrevrange(keys.metrics(run_id), count=RECENT_ITERS)
    for _, fields in recent:
        if fields.get(b"kind") == b"iter":
            return dict(json.loads(fields[b"json"]))
    return {}


def counters(client: redis.Redis, run_id: str) -> dict[str, Any]:
    """Every process's message counters: broker, stage:1..S (and stage:17, the synthesizer
    service, when it ran)."""
    _config(client, run_id)
    count = int(client.hget(keys.state(run_id), "stages") or 0)
    out = {}
    for who in ["broker", *[f"stage:{s}" for s in (*range(1, count + 1), protocol.SYNTH)]]:
        got = _hash(client, keys.counters(run_id, who))
        if got or who != f"stage:{protocol.SYNTH}":
            out[who] = {k: _number(v) for k, v in got.items()}
    return {"run": run_id, "counters": out}


def backups(client: redis.Redis, run_id: str) -> dict[str, Any]:
    """The iterations each stage has a backup of, and those every stage has (a rollback's
    choices)."""
    _config(client, run_id)
    count = int(client.hget(keys.state(run_id), "stages") or 0)
    per = {str(s): sorted(int(keys.text(v)) for v in
                          client.zrange(keys.checkpoints(run_id, s), 0, -1))
           for s in range(1, count + 1)}
    common = sorted(set.intersection(*(set(v) for v in per.values()))) if per else []
    return {"run": run_id, "stages": per, "common": common}


def _since(value: str | None) -> str:
    since = value or "0"
    if not STREAM_ID.fullmatch(since):
        raise BadParameter(f"since={since[:40]!r} is not a record id (like 1712345678901-0)")
    return since


def _read_stream(client: redis.Redis, key: str, since: str | None, limit: int
                 ) -> tuple[list[dict[str, Any]], str, bool]:
    start = _since(since)
    got: Any = client.xrange(key, min=f"({start}" if start != "0" else "-", count=limit + 1)
    more = len(got) > limit
    records = []
    for raw_id, fields in got[:limit]:
        try:
            record = dict(json.loads(fields[b"json"]))
        except (KeyError, ValueError, TypeError):
            continue  # not ours: skipped, never fatal
        records.append({"id": keys.text(raw_id), **record})
    last = keys.text(got[:limit][-1][0]) if got else start
    return records, last, more


def metrics(client: redis.Redis, run_id: str, since: str | None = None,
            limit: int = 2000) -> dict[str, Any]:
    """Metric records (zdni/metrics.py) after record id `since` (all from the start without
    it), at most `limit`; `last` is the id to ask from next, `more` that some were left."""
    _config(client, run_id)
    records, last, more = _read_stream(client, keys.metrics(run_id), since, limit)
    return {"run": run_id, "records": records, "last": last, "more": more}


def events(client: redis.Redis, run_id: str, since: str | None = None,
           limit: int = 500) -> dict[str, Any]:
    """Health changes and operator actions after event id `since`, oldest first."""
    _config(client, run_id)
    records, last, more = _read_stream(client, keys.event_log(run_id), since, limit)
    return {"run": run_id, "events": records, "last": last, "more": more}
