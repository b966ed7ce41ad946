"""The live progress line: a redrawn bar on a terminal, plain log lines with --quiet or otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Shows iteration progress with epoch, loss, accuracy, samples/s and the slowest stage's lag."""

    def __init__(
        self, total: int, label: str, quiet: bool = False, stream: TextIO | None = None,
        log_every_s: float = 10.0,
    ) -> None:
        self.total = max(total, 0)  # 0: unknown (a stream, whose end comes when it comes)
        self.label = label
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() and not quiet
        self.log_every_s = log_every_s
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.last_log = self.start
        self.latest: tuple[int, dict[str, object]] | None = None  # for the closing log line
        self.logged = -1  # the `done` of the last plain log line

    def update(self, done: int, **fields: object) -> None:
        """Redraw (at most 10 times a second) or, off a terminal, log every log_every_s seconds."""
        now = time.monotonic()
        self.latest = (done, fields)
        if self.tty and now - self.last_draw < 0.1 and (not self.total or done < self.total):
            return
        if not self.tty and now - self.last_log < self.log_every_s:
            return
        self._draw(now, done, fields)

    def _draw(self, now: float, done: int, fields: dict[str, object]) -> None:
        elapsed = max(now - self.start, 1e-9)
        parts = [f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None]
        if not self.total:
            text = f"[{self.label}] it {done} {elapsed:.0f}s " + " ".join(parts)
            self.stream.write(f"\r{text}\x1b[K" if self.tty else f"{text}\n")
            self.last_draw = self.last_log = now
            self.logged = done
            self.stream.flush()
            return
        frac = min(done / self.total, 1.0)
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        text = f"it {done}/{self.total} {elapsed:.0f}s<{eta:.0f}s " + " ".join(parts)
        if self.tty:
            width = 24
            filled = int(width * frac)
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r[{self.label}] |{bar}| {100 * frac:5.1f}% {text}\x1b[K")
            self.last_draw = now
        else:
            self.stream.write(f"[{self.label}] {100 * frac:5.1f}% {text}\n")
            self.last_log = now
            self.logged = done
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line; off a terminal, log the final state unless it was just logged."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        elif self.latest is not None and self.latest[0] != self.logged:
            self._draw(time.monotonic(), *self.latest)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
