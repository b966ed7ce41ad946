"""RedisWatch: calls fail softly while Redis is away, it says so once each way, and gives up
after the timeout (a fake clock, no sockets)."""

from __future__ import annotations

import logging

import pytest
import redis

from zdni.outage import RedisGone, RedisWatch


class Flaky:
    def __init__(self) -> None:
        self.up = True
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if not self.up:
            raise redis.ConnectionError("Connection refused")
        return "ok"


def test_outage_is_survived_and_told_once_each_way(caplog: pytest.LogCaptureFixture) -> None:
    """While Redis is away calls return the default and are retried at most once a second;
    the log says once that it is gone and once that it is back."""
    now = [0.0]
    watch = RedisWatch("[stage 1]", timeout_s=60, clock=lambda: now[0])
    fn = Flaky()
    caplog.set_level(logging.INFO, "zdni.outage")
    assert watch.call(fn) == "ok"
    fn.up = False
    for t in range(40):  # 4 s of calls every 0.1 s
        now[0] = 10 + t / 10
        assert watch.call(fn, default="skip") == "skip"
    assert fn.calls == 1 + 4  # one try a second while away
    fn.up = True
    now[0] = 15.0
    assert watch.call(fn) == "ok" and watch.up
    gone = [r for r in caplog.records if "Redis is gone" in r.message]
    back = [r for r in caplog.records if "Redis is back after 5.0 s" in r.message]
    assert len(gone) == 1 and len(back) == 1 and watch.outages == 1


def test_an_outage_past_the_timeout_is_fatal() -> None:
    """Away longer than timeout_s, the next call raises RedisGone naming the timeout."""
    now = [0.0]
    watch = RedisWatch("[driver]", timeout_s=5, clock=lambda: now[0])
    fn = Flaky()
    fn.up = False
    watch.call(fn)
    now[0] = 4.0
    watch.call(fn)
    now[0] = 6.0
    with pytest.raises(RedisGone, match="unreachable for 6 s"):
        watch.call(fn)


def test_a_last_word_waits_for_redis_then_gives_up_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """settle tries again every RETRY_S while Redis is away and returns what the call returns
    once it is back; away past wait_s it returns the default, logs the loss, never raises."""
    now = [0.0]
    watch = RedisWatch("[stage 1]", timeout_s=5, clock=lambda: now[0])
    fn = Flaky()
    fn.up = False
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s
        if now[0] >= 3.0:
            fn.up = True

    assert watch.settle(fn, wait_s=30, sleep=sleep) == "ok"
    assert slept == [1.0, 1.0, 1.0] and fn.calls == 4 and watch.up
    fn.up = False
    caplog.set_level(logging.ERROR, "zdni.outage")
    now[0] = 100.0
    assert watch.settle(fn, wait_s=2.5, sleep=lambda s: now.__setitem__(0, now[0] + s),
                        default="lost") == "lost"  # past timeout_s too: no RedisGone
    assert fn.calls == 4 + 4  # at 0, 1, 2 and 2.5 s
    assert any("last record is lost" in r.message for r in caplog.records)
