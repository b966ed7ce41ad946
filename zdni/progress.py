"""The live progress line: a redrawn bar on a terminal, plain log lines otherwise."""

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
        self.total = max(total, 1)
        self.label = label
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() and not quiet
        self.log_every_s = log_every_s
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.last_log = self.start

    def update(self, done: int, **fields: object) -> None:
        """Redraw (at most 10 times a second) or, off a terminal, log every log_every_s seconds."""
        now = time.monotonic()
        if self.tty and now - self.last_draw < 0.1 and done < self.total:
            return
        if not self.tty and (self.quiet or now - self.last_log < self.log_every_s):
            return
        elapsed = max(now - self.start, 1e-9)
        frac = min(done / self.total, 1.0)
        parts = [f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None]
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        text = f"{done}/{self.total} {elapsed:.0f}s<{eta:.0f}s " + " ".join(parts)
        if self.tty:
            width = 24
            filled = int(width * frac)
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r[{self.label}] |{bar}| {100 * frac:5.1f}% {text}\x1b[K")
            self.last_draw = now
        else:
            self.stream.write(f"[{self.label}] {100 * frac:5.1f}% {text}\n")
            self.last_log = now
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
