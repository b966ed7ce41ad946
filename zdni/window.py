"""The driver's in-flight window: what is fed, what is done, what is lost and fed again (pure).

No sockets, no clocks of its own: the driver passes `now` in, so every rule here is a table test
(tests/test_window.py). The rules:

- At most `size` iterations are in flight (fed, not yet finished by every stage).
- An iteration is finished when every stage has reported its update for it.
- An iteration unfinished `lost_s` after it was fed lost a message on the way: it is dropped and
  its batch waits in `replay`, to be fed again as a *new* iteration (a stage never trains one
  iteration twice). After more than `tries` such losses in a row with no iteration finished
  between them, the run is stuck.
- A failed stage loses every in-flight iteration it has not finished.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LOST_TRIES", "Lost", "Window"]

LOST_TRIES = 3  # lost iterations fed again in a row before the run is declared stuck


@dataclass
class Lost:
    """The iterations found lost at one check, the stages that never reported the first of them,
    and whether the losses in a row now exceed the tries (the run is stuck)."""

    iterations: list[int]
    behind: list[int]
    stuck: bool


@dataclass
class Flight:
    """One iteration in flight: its batch (kept for a replay), when it was fed, who finished it."""

    batch: Any
    fed_at: float
    done: set[int] = field(default_factory=set)


class Window:
    """The iterations in flight of one run, and the batches waiting to be fed again."""

    def __init__(self, stages: int, size: int, lost_s: float, tries: int = LOST_TRIES) -> None:
        self.stages = stages
        self.size = size
        self.lost_s = lost_s
        self.tries = tries
        self.fed = 0  # iterations fed so far; the next iteration's number
        self.flights: dict[int, Flight] = {}
        self.replay: deque[Any] = deque()  # batches lost on the way, to be fed again first
        self.tally: Counter[str] = Counter()  # fed, replayed, dropped:REASON
        self.last_done = dict.fromkeys(range(1, stages + 1), -1)
        self.lost_streak = 0  # losses in a row with no iteration finished between them

    # -- state ---------------------------------------------------------------------------------
    @property
    def inflight(self) -> list[int]:
        return sorted(self.flights)

    def full(self) -> bool:
        return len(self.flights) >= self.size

    def lags(self) -> dict[int, int]:
        """Per stage, the iterations fed but not yet finished by it (its queue depth)."""
        return {s: self.fed - 1 - d for s, d in self.last_done.items()}

    def start_at(self, fed: int) -> None:
        """Number the next iteration `fed`, every stage having finished those before it (a
        resumed run goes on from its checkpoint)."""
        self.fed = fed
        self.last_done = dict.fromkeys(self.last_done, fed - 1)

    # -- events --------------------------------------------------------------------------------
    def feed(self, batch: Any, now: float) -> int:
        """Put a batch in flight as the next iteration; returns its number."""
        it = self.fed
        self.flights[it] = Flight(batch, now)
        self.tally["fed"] += 1
        self.fed = it + 1
        return it

    def done(self, it: int, stage: int) -> bool:
        """Stage `stage` finished its update of `it`; True when that finishes the iteration.
        A report of an iteration not in flight (finished, replayed, forged) changes nothing."""
        flight = self.flights.get(it)
        if flight is None or not 1 <= stage <= self.stages:
            return False
        self.last_done[stage] = max(self.last_done[stage], it)
        flight.done.add(stage)
        if len(flight.done) < self.stages:
            return False
        del self.flights[it]
        self.lost_streak = 0
        return True

    def lost(self, now: float) -> Lost | None:
        """The iterations unfinished `lost_s` after they were fed, or None. Counts one loss in a
        row; the caller replays them (`drop`) unless the run is stuck."""
        late = sorted(t for t, f in self.flights.items() if now - f.fed_at > self.lost_s)
        if not late:
            return None
        behind = [s for s in range(1, self.stages + 1) if s not in self.flights[late[0]].done]
        self.lost_streak += 1
        return Lost(late, behind, self.lost_streak > self.tries)

    def unfinished_by(self, stage: int) -> list[int]:
        """The iterations in flight that `stage` has not finished (lost if it failed)."""
        return sorted(t for t, f in self.flights.items() if stage not in f.done)

    def drop(self, iterations: list[int], reason: str) -> None:
        """Count iterations as dropped and queue their batches to be fed again as new ones."""
        for t in iterations:
            flight = self.flights.pop(t, None)
            if flight is None:
                continue
            self.replay.append(flight.batch)
            self.tally[f"dropped:{reason}"] += 1
            self.tally["replayed"] += 1

    def behind(self) -> list[int]:
        """The stages that have not finished the newest iteration but one (a stall's culprits)."""
        return [s for s, it in self.last_done.items() if it < self.fed - 1]
