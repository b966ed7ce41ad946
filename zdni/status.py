"""What `zdni status` shows: a run's progress and every stage's health, read from Redis."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from zdni import keys, protocol


def _hash(client: redis.Redis, key: str) -> dict[str, str]:
    return {keys.text(k): keys.text(v) for k, v in client.hgetall(key).items()}


def latest_run(client: redis.Redis) -> str | None:
    """The run the driver started last."""
    current = client.get(keys.current_run())
    return keys.text(current) if current else None


def require_run(client: redis.Redis, run: str) -> None:
    """Raise KeyError naming the run and the newest runs Redis knows, if it does not know it."""
    if client.get(keys.config(run)) is None:
        raise KeyError(f"no run {run!r} in this Redis (known: "
                       f"{[keys.text(r) for r in client.zrange(keys.runs(), -5, -1)]})")


def collect(client: redis.Redis, run: str) -> dict[str, Any]:
    """The run's state and, per stage, health, heartbeat (with its age) and counters."""
    require_run(client, run)
    state = _hash(client, keys.state(run))
    stages = int(state.get("stages", "0"))
    health = _hash(client, keys.health(run))
    now = time.time()
    over = state.get("status") in ("finished", "failed", "stopped")  # no stage of it is alive
    rows = []
    for stage in [*range(1, stages + 1), protocol.SYNTH]:
        beat = _hash(client, keys.heartbeat(run, stage))
        counts = _hash(client, keys.counters(run, f"stage:{stage}"))
        if stage == protocol.SYNTH and not beat:
            continue
        age = now - float(beat["time"]) if "time" in beat else None
        rows.append({
            "stage": "synth" if stage == protocol.SYNTH else stage,
            "state": "stopped" if over else health.get(str(stage), beat.get("status", "missing")),
            "iteration": int(beat.get("iteration", -1)),
            "heartbeat_age_s": round(age, 2) if age is not None else None,
            "cpu_percent": float(beat.get("cpu_percent", 0.0)),
            "rss_mb": round(float(beat.get("rss_mb", 0.0)), 1),
            "gpu_mem_mb": float(beat["gpu_mem_mb"]) if "gpu_mem_mb" in beat else None,
            "trained": int(counts.get("trained", 0)),
            "dropped": sum(int(v) for k, v in counts.items() if k.startswith("dropped:")),
            "host": beat.get("host"),
        })
    broker = _hash(client, keys.counters(run, "broker"))
    return {"run": run, "state": state, "stages": rows,
            "broker": {k: int(v) for k, v in broker.items()}}


def render(status: dict[str, Any]) -> str:
    """A table for the terminal."""
    st = status["state"]
    scored = next(((k, v) for k, v in st.items() if k.startswith(("val_", "test_"))
                   and not k.endswith("_loss")), ("test_accuracy", "-"))
    # The driver records epoch and score at each epoch's end, `fed` at every health check:
    # the newest iteration is what the stages say they trained, not the last epoch's end.
    newest = max([int(st.get("iteration", 0))] + [r["iteration"] for r in status["stages"]])
    lines = [f"run {status['run']}: {st.get('status', '?')}, epoch {st.get('epoch', 0)} done,"
             f" iteration {newest} (fed {st.get('fed', 0)}), {scored[0].replace('_', ' ')} "
             f"{scored[1]}"]
    head = f"{'stage':>6} {'state':<10} {'iter':>7} {'beat age':>8} {'cpu%':>6} {'rss MB':>7}" \
           f" {'trained':>8} {'dropped':>8}  host"
    lines.append(head)
    for r in status["stages"]:
        age = f"{r['heartbeat_age_s']:.1f}s" if r["heartbeat_age_s"] is not None else "-"
        lines.append(f"{r['stage']!s:>6} {r['state']:<10} {r['iteration']:>7} {age:>8}"
                     f" {r['cpu_percent']:>6.0f} {r['rss_mb']:>7.0f} {r['trained']:>8}"
                     f" {r['dropped']:>8}  {r['host'] or '-'}")
    b = status["broker"]
    dropped = {k: v for k, v in b.items() if k.startswith("dropped:")}
    lines.append(f"broker: received {b.get('received', 0)}, forwarded {b.get('forwarded', 0)},"
                 f" dropped {json.dumps(dropped) if dropped else 0}")
    return "\n".join(lines)
