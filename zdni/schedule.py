"""The order of each stage's events with W batches in flight (pure): the W-window oracle.

Both runners can apply a stage's events in this order: the in-process reference always, a
worker when the run is `ordered` (a test switch: it holds what comes early until its turn).
Events of different stages touch different state, so equal per-stage orders give equal results,
parameter for parameter, whatever the processes' speeds.

Stage i's order in one segment of iterations a..b-1 (between two drains of the pipeline: an
epoch's end, an extra evaluation or a checkpoint), with window W:

    for t in a..b-1:
        batch(u) for each u <= t + W - 1 not taken yet    (stages whose method has a batch event)
        input(t)
        grad(t - W + 1)                                    (stages a gradient comes back to)
    then the gradients the loop left: grad(b - W + 1), ..., grad(b - 1)

so a stage runs W - 1 iterations ahead of the gradients it receives: the staleness of a
pipeline whose window binds (the driver keeps W iterations in flight and the first stage runs
ahead), at every stage. With W = 1 it is the one-in-flight order: batch(t), input(t), grad(t).
The order needs no more than W iterations in flight at once (tests/test_schedule.py checks it
against a simulated driver).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Cursor", "Event", "Turns", "next_drain"]

Event = tuple[Literal["batch", "input", "grad"], int]


@dataclass
class Cursor:
    """Where one stage is in its order. `batch_event`/`grad_event`: which events the stage
    receives (zdni.stage.Wiring); `end`: the segment's end once known (None: it goes on)."""

    window: int
    batch_event: bool = False
    grad_event: bool = False
    start: int = 0
    end: int | None = None

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        self.begin(self.start, self.end)

    def begin(self, start: int, end: int | None = None) -> None:
        """Start a segment at iteration `start` (its end, if known)."""
        self.start = self.input = self.batch = self.grad = start
        self.end = end
        self.took_input = False

    def peek(self) -> Event | None:
        """The next event, or None once the segment is over (its end known and reached)."""
        w = self.window
        while True:
            if self.end is not None and self.input >= self.end:
                if self.grad_event and self.grad < self.end:
                    return ("grad", self.grad)
                return None
            if self.batch_event and self.batch <= self.input + w - 1 and (
                    self.end is None or self.batch < self.end):
                return ("batch", self.batch)
            if not self.took_input:
                return ("input", self.input)
            if self.grad_event and self.grad <= self.input - w + 1:
                return ("grad", self.grad)
            self.input += 1
            self.took_input = False

    def advance(self) -> Event:
        """Take the next event (it must exist); returns it."""
        event = self.peek()
        if event is None:
            raise ValueError("the segment is over")
        kind = event[0]
        if kind == "batch":
            self.batch += 1
        elif kind == "input":
            self.took_input = True
        else:
            self.grad += 1
        return event

    def staleness(self, it: int) -> int:
        """How many iterations past `it` this stage has taken inputs of (a gradient's age)."""
        return self.input - it - (0 if self.took_input else 1)


def next_drain(it: int, per_epoch: int, eval_every: int = 0) -> int:
    """The first iteration count after `it` at which the training loop drains the pipeline:
    an epoch's end (every `per_epoch` batches) or an extra evaluation (every `eval_every`)."""
    if per_epoch < 1:
        raise ValueError(f"per_epoch must be >= 1, got {per_epoch}")
    ends = [(it // per_epoch + 1) * per_epoch]
    if eval_every > 0:
        ends.append((it // eval_every + 1) * eval_every)
    return min(ends)


class Turns:
    """A worker's events held until their turn in the oracle's order (an `ordered` run): the
    segments end where the training loop drains (`next_drain`)."""

    def __init__(self, cursor: Cursor, per_epoch: int, eval_every: int = 0) -> None:
        self.cursor = cursor
        self.per_epoch = per_epoch
        self.eval_every = eval_every
        cursor.begin(0, next_drain(0, per_epoch, eval_every))
        self.held: dict[Event, Any] = {}

    def start_at(self, start: int) -> None:
        """Go on from iteration `start`, nothing in flight (a resumed or restarted stage)."""
        self.cursor.begin(start, next_drain(start, self.per_epoch, self.eval_every))
        self.held = {e: p for e, p in self.held.items() if e[1] >= start}

    def end_at(self, end: int) -> None:
        """The current segment ends at `end`: a drain the loop makes unforeseen (a checkpoint)."""
        if self.cursor.start < end and (self.cursor.end is None or end < self.cursor.end):
            self.cursor.end = end

    def finished(self, it: int) -> bool:
        """Whether every event of iterations up to `it` has run (a segment ended past it)."""
        return self.cursor.start > it

    def add(self, event: Event, payload: Any = None) -> None:
        """An event is ready to run (with what it needs, e.g. a gradient)."""
        self.held[event] = payload

    def due(self) -> Iterator[tuple[Event, Any]]:
        """The held events whose turn has come, in order, each taken as it is yielded."""
        while True:
            event = self.cursor.peek()
            if event is None:  # the segment is over: the next one starts where it ended
                start = self.cursor.end or 0
                self.cursor.begin(start, next_drain(start, self.per_epoch, self.eval_every))
                continue
            if event not in self.held:
                return
            payload = self.held.pop(event)
            self.cursor.advance()
            yield event, payload
