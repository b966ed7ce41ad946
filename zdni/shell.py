"""What every process shell (broker, stage worker, synthesizer service) shares: its log format,
the two-stage stop and reading its run's config from Redis. Imports no torch (the broker uses it).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any, NoReturn

import redis

from zdni import keys
from zdni.config import RunConfig

__all__ = ["Stopper", "leave_now", "read_config", "setup_logging"]


def setup_logging(who: str) -> None:
    """Log lines that say who speaks (`[stage 2]`), at ZDNI_LOG's level (default INFO)."""
    logging.basicConfig(level=os.environ.get("ZDNI_LOG", "INFO"), force=True,
                        format=f"%(asctime)s {who} %(levelname)s %(message)s")


class Stopper:
    """The two-stage stop: the first SIGTERM (or `stop()`) lets the current message finish and
    the loop end at its next turn; a second SIGTERM exits at once."""

    def __init__(self) -> None:
        self.stopping = False
        self.signalled = False  # stopped by a signal (leave the process), not by a message
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def stop(self) -> None:
        self.stopping = True

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.signalled:
            raise SystemExit(1)
        self.stopping = self.signalled = True


def read_config(client: redis.Redis, run: str, who: str) -> RunConfig:
    """The run's published config, or exit naming the run when Redis has none."""
    raw = client.get(keys.config(run))
    if raw is None:
        raise SystemExit(f"{who} run {run!r} has no config in Redis")
    return RunConfig.from_json(raw)


def leave_now(code: int = 0) -> NoReturn:
    """End a process shell whose work is done (sockets closed, backup written, 'stopped' beaten)
    without the interpreter's teardown: with torch loaded that takes seconds on a busy host (5 s
    of a failed run's 9, measured at load 15 on 2 cores) and does nothing the process still
    needs. Logs and stdio are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
