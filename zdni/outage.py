"""Living through a Redis outage: every process keeps working while Redis is away, says once
that it is gone and once that it is back, and gives up only after `timeout_s` without it.

What cannot wait is not sent to Redis while it is away (heartbeats, counters, metrics, ring
slots: each is written again, or replaced, once it is back); a process calls through a
RedisWatch and gets a default instead of an exception. A run's last words (each stage's final
beat and counters, the driver's final record) wait for Redis instead: RedisWatch.settle.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from zdni.errors import ZdniError

__all__ = ["RedisGone", "RedisWatch", "TRANSIENT"]

log = logging.getLogger("zdni.outage")
T = TypeVar("T")
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError, OSError)
RETRY_S = 1.0  # while Redis is away, try it again at most this often (calls in between skip)


class RedisGone(ZdniError, RuntimeError):
    """Redis has been unreachable for longer than the process may go without it."""


class RedisWatch:
    """Calls into Redis that fail softly while it is away, up to `timeout_s` seconds."""

    def __init__(self, who: str, timeout_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.who = who
        self.timeout_s = timeout_s
        self.clock = clock
        self.down_since: float | None = None
        self.next_try = 0.0
        self.outages = 0  # how many times Redis went away
        self.skipped = 0  # calls not made, or failed, while it was away

    @property
    def up(self) -> bool:
        return self.down_since is None

    def call(self, fn: Callable[..., T], *args: Any, default: T | None = None,
             **kwargs: Any) -> T | None:
        """fn(*args, **kwargs), or `default` while Redis is away. Raises RedisGone once it has
        been away longer than timeout_s."""
        now = self.clock()
        if self.down_since is not None and now < self.next_try:
            self.skipped += 1
            self._check(now)
            return default
        try:
            out = fn(*args, **kwargs)
        except TRANSIENT as exc:
            self.went(exc)
            self.skipped += 1
            return default
        self.came_back()
        return out

    def settle(self, fn: Callable[..., T], *args: Any, wait_s: float = 30.0,
               sleep: Callable[[float], None] = time.sleep, default: T | None = None,
               **kwargs: Any) -> T | None:
        """fn(*args, **kwargs) for a last word that must not be skipped (a stage's final beat and
        counters, the driver's final record of the run): while Redis is away, tried again every
        RETRY_S seconds for up to wait_s seconds, then `default` with an error in the log.
        Never raises RedisGone: the run is over either way."""
        deadline = self.clock() + wait_s
        while True:
            try:
                out = fn(*args, **kwargs)
            except TRANSIENT as exc:
                self.skipped += 1
                with contextlib.suppress(RedisGone):
                    self.went(exc)
                left = deadline - self.clock()
                if left <= 0:
                    log.error("%s Redis still away after %.0f s; the run's last record is lost",
                              self.who, wait_s)
                    return default
                sleep(min(RETRY_S, left))
                continue
            self.came_back()
            return out

    def went(self, exc: BaseException) -> None:
        """Redis failed a call: note it (once per outage in the log); raise after timeout_s."""
        now = self.clock()
        if self.down_since is None:
            self.down_since = now
            self.outages += 1
            log.error("%s Redis is gone (%s); carrying on without it for up to %.0f s",
                      self.who, " ".join(str(exc).split())[:120], self.timeout_s)
        self.next_try = now + RETRY_S
        self._check(now)

    def came_back(self) -> None:
        if self.down_since is not None:
            log.warning("%s Redis is back after %.1f s", self.who, self.clock() - self.down_since)
            self.down_since = None

    def _check(self, now: float) -> None:
        if self.down_since is not None and now - self.down_since > self.timeout_s:
            raise RedisGone(f"{self.who} Redis unreachable for {now - self.down_since:.0f} s "
                            f"(--redis-timeout {self.timeout_s:.0f}); giving up")
