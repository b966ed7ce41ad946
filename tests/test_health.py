"""Tests of zdni.health: the liveness rule as a table, and heartbeats written to a real Redis."""

from __future__ import annotations

import os
import time

import psutil
import pytest
import redis

from zdni import keys
from zdni.health import Liveness, beat, check

STOP = "stop"  # a check that finds the stage's status 'stopped'

# (case, beat time seen at each check (None: no key; STOP: status 'stopped'), states after each)
LIVENESS = [
    ("new beats", [1.0, 2.0, 3.0], "alive alive alive"),
    ("one miss stays alive", [1.0, 1.0], "alive alive"),
    ("two misses fail", [1.0, 1.0, 1.0], "alive alive failed"),
    ("missing key is a miss", [1.0, None, None], "alive alive failed"),
    ("never beat", [None, None], "alive failed"),
    ("a beat resets misses", [1.0, 1.0, 2.0, 2.0, 3.0], "alive alive alive alive alive"),
    ("beat after failure", [1.0, 1.0, 1.0, 2.0], "alive alive failed alive"),
    ("failed stays failed", [1.0, 1.0, 1.0, 1.0, None], "alive alive failed failed failed"),
    ("stopped", [1.0, STOP], "alive stopped"),
    ("stopped never fails", [1.0, STOP, STOP, None, None, None], "alive stopped stopped stopped "
                                                                  "stopped stopped"),
    ("restart after stop", [1.0, STOP, None, 5.0], "alive stopped stopped alive"),
]


@pytest.mark.parametrize(("case", "beats", "states"), LIVENESS, ids=[row[0] for row in LIVENESS])
def test_liveness_table(case: str, beats: list[float | str | None], states: str) -> None:
    """Two consecutive checks without a new beat fail a stage; a new beat revives it."""
    live = Liveness()
    seen = []
    for b in beats:
        if b == STOP:
            live = check(live, 9.0, stopped=True)
        else:
            assert not isinstance(b, str)
            live = check(live, b)
        seen.append(live.state)
    assert " ".join(seen) == states


def test_check_counts_misses_and_keeps_the_last_beat() -> None:
    """A miss keeps the last beat time seen and counts up; a new beat clears the count."""
    live = check(Liveness(), 4.0)
    assert (live.last_beat, live.misses) == (4.0, 0)
    live = check(live, None)
    assert (live.last_beat, live.misses, live.state) == (4.0, 1, "alive")
    live = check(live, 4.0)
    assert (live.last_beat, live.misses, live.state) == (4.0, 2, "failed")
    live = check(live, 6.5)
    assert (live.last_beat, live.misses, live.state) == (6.5, 0, "alive")


def test_starting_stage_keeps_its_state_on_one_miss() -> None:
    """A stage the monitor knows as 'starting' stays so on one miss and turns alive on a beat."""
    start = Liveness(state="starting")
    assert check(start, None).state == "starting"
    assert check(start, 1.0).state == "alive"


def test_beat_writes_heartbeat_and_counters(redis_client: redis.Redis) -> None:
    """beat() writes an expiring heartbeat (status, iteration, utilization) and the counters."""
    beat(redis_client, "r1", 2, "alive", 17, {"received": 5, "dropped:shape": 1}, "cpu",
         interval=1.0)
    raw = redis_client.hgetall(keys.heartbeat("r1", 2))
    hb = {keys.text(k): keys.text(v) for k, v in raw.items()}
    assert hb["status"] == "alive"
    assert int(hb["iteration"]) == 17
    assert int(hb["pid"]) == os.getpid()
    assert hb["device"] == "cpu"
    assert abs(float(hb["rss_mb"]) - psutil.Process().memory_info().rss / 2**20) < 64
    assert abs(float(hb["time"]) - time.time()) < 30
    spent = time.process_time() + 0.2  # busy for 0.2 s of CPU: the next beat says so
    while time.process_time() < spent:
        pass
    beat(redis_client, "r1", 2, "alive", 18, {}, "cpu", interval=1.0)
    assert float(keys.text(redis_client.hget(keys.heartbeat("r1", 2), "cpu_percent"))) > 5
    assert 0 < redis_client.ttl(keys.heartbeat("r1", 2)) <= 5
    counts = redis_client.hgetall(keys.counters("r1", "stage:2"))
    assert counts == {b"received": b"5", b"dropped:shape": b"1"}


def test_beat_expiry_and_overwrite(redis_client: redis.Redis) -> None:
    """A short interval still expires after >= 2 s; a later beat replaces status and iteration,
    and a 'stopped' beat stays (zdni status shows where a stage ended)."""
    beat(redis_client, "r1", 1, "alive", 0, {}, "cpu", interval=0.1)
    ttl = redis_client.ttl(keys.heartbeat("r1", 1))
    assert 0 < ttl <= 2
    assert not redis_client.exists(keys.counters("r1", "stage:1"))  # no counts, no hash
    beat(redis_client, "r1", 1, "stopped", 3, {"trained": 3}, "cpu", interval=2.0)
    assert redis_client.hget(keys.heartbeat("r1", 1), "status") == b"stopped"
    assert redis_client.hget(keys.heartbeat("r1", 1), "iteration") == b"3"
    assert redis_client.ttl(keys.heartbeat("r1", 1)) == -1  # a stopped beat stays: the last word
    assert redis_client.hget(keys.counters("r1", "stage:1"), "trained") == b"3"


def test_published_events_are_kept_in_the_event_log(redis_client: redis.Redis) -> None:
    """publish() announces on the channel and keeps the event in the run's stream, in order."""
    import json

    from zdni.health import publish

    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.events("r1"))
    pubsub.get_message(timeout=1.0)  # the subscription's confirmation
    publish(redis_client, "r1", {"stage": 2, "state": "failed", "time": 1.0})
    publish(redis_client, "r1", {"stage": 2, "state": "alive", "time": 2.0})
    kept = [json.loads(fields[b"json"]) for _, fields in
            redis_client.xrange(keys.event_log("r1"))]
    assert [e["state"] for e in kept] == ["failed", "alive"]
    message = pubsub.get_message(timeout=1.0)
    assert message is not None and json.loads(message["data"])["state"] == "failed"
    pubsub.close()
