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
