"""The W-window oracle: every stage in this process, each applying its events in the order of
zdni/schedule.py, so a run with W batches in flight is deterministic and the distributed
pipeline, forced into the same per-stage orders (`ordered` runs), equals it exactly.

Batches come in with `feed`; every event whose inputs exist runs at once, in a fixed sweep over
the stages (the sweep order cannot change a result: a stage's state depends on its own order
only). `drain` ends the segment, as the training loop does before it evaluates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zdni import failure
from zdni.rng import span
from zdni.schedule import Cursor, Event
from zdni.stage import Outcome, Stage

__all__ = ["Oracle", "replay"]

Report = tuple[int, Outcome]  # (stage index, what one event produced)


class Oracle:
    """`stages` (a whole pipeline, 1..S in order) run with `window` batches in flight."""

    def __init__(self, stages: Sequence[Stage], window: int = 1) -> None:
        self.stages = list(stages)
        self.window = window
        self.cursors = []
        for stage in self.stages:
            wiring = stage.wiring(stage.index, len(self.stages))
            self.cursors.append(Cursor(window, wiring.batch_event, wiring.grad_event))
        self.batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.acts: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (i, t): (h, y)
        self.grads: dict[tuple[int, int], torch.Tensor] = {}  # (i, t): gradient of i's output
        self.fed = 0
        self.start = 0  # the first iteration of the current segment

    def start_at(self, fed: int) -> None:
        """Go on from iteration `fed` (a resumed run), nothing in flight."""
        self.fed = self.start = fed
        for cursor in self.cursors:
            cursor.begin(fed)

    def feed(self, x: torch.Tensor, y: torch.Tensor) -> list[Report]:
        """Put the next batch in flight and run every event that can run; returns the reports
        (updates finished, synthesizers trained) in the order they happened."""
        self.batches[self.fed] = (x, y)
        self.fed += 1
        return self._run()

    def drain(self) -> list[Report]:
        """End the segment: run every stage's remaining events of the iterations fed."""
        for cursor in self.cursors:
            cursor.end = self.fed
        reports = self._run()
        waiting = [(s.index, c.peek()) for s, c in zip(self.stages, self.cursors) if c.peek()]
        if waiting:  # an order the schedule promises to be complete: a bug, not a user's error
            raise RuntimeError(f"the schedule left events that cannot run: {waiting}")
        for cursor in self.cursors:
            cursor.begin(self.fed)
        self.batches.clear()
        self.start = self.fed
        return reports

    def _forget_batches(self) -> None:
        """Drop the batches no stage will read again (stage 1's inputs, the batch events)."""
        needed = [self.cursors[0].input] + [c.batch for c in self.cursors if c.batch_event]
        for t in [t for t in self.batches if t < min(needed)]:
            del self.batches[t]

    def _ready(self, i: int, event: Event) -> bool:
        kind, t = event
        if kind == "batch" or (kind == "input" and i == 1):
            return t < self.fed
        if kind == "input":
            return (i - 1, t) in self.acts
        return (i, t) in self.grads

    def _run(self) -> list[Report]:
        reports: list[Report] = []
        moved = True
        while moved:
            moved = False
            for i, (stage, cursor) in enumerate(zip(self.stages, self.cursors), start=1):
                while (event := cursor.peek()) is not None and self._ready(i, event):
                    staleness = cursor.staleness(event[1])
                    cursor.advance()
                    units = span(stage.module)  # a user's code raising, or non-finite values,
                    with failure.guard(i, units, event[1], event[0]):  # end the run in a line
                        out = self._apply(i, stage, event)
                    failure.check(i, units, event[1], event[0], out.h_out, out.d_in, out.metrics)
                    if event[0] == "grad":  # how late the true gradient came, as a worker says
                        out.metrics["staleness"] = float(staleness)
                    if out.done or out.metrics:
                        reports.append((i, out))
                    moved = True
        self._forget_batches()
        return reports

    def _apply(self, i: int, stage: Stage, event: Event) -> Outcome:
        kind, t = event
        if kind == "batch":
            x, y = self.batches[t]
            out = stage.train_batch(t, x, y if stage.needs_y else None)
        elif kind == "input":
            if i == 1:
                h, y = self.batches[t]
            else:
                h, y = self.acts.pop((i - 1, t))
            out = stage.train_input(t, h, y if stage.needs_y else None)
            if out.h_out is not None:
                self.acts[(i, t)] = (out.h_out, y)
        else:
            out = stage.train_grad(t, self.grads.pop((i, t)))
        if out.d_in is not None and i > 1:
            self.grads[(i - 1, t)] = out.d_in
        return out


def replay(stages: Sequence[Stage], batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
           window: int = 1) -> list[Report]:
    """Train `stages` on `batches` as one segment with `window` in flight; returns the reports."""
    oracle = Oracle(stages, window)
    reports = []
    for x, y in batches:
        reports += oracle.feed(x, y)
    return reports + oracle.drain()
