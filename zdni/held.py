"""The synthesizer numbers a stage holds for its next DONE report, one event after another.

A stage reports what training M (and I) measured in its next 'update' DONE, not in a message
of its own (zdni.protocol DONE). With several batches in flight, M often trains twice or more
between two updates; the stage then sends the first event's numbers under their names and the
k-th event's as NAME/k (k = 2, 3, ...), and the driver (zdni.metrics.MetricsWriter.observe)
takes NAME/k as one more NAME: every number arrives as if each event had its own message
(means, maxima and counts alike), with one message fewer per extra event.
"""

from __future__ import annotations

SEP = "/"  # meta NAME/k: the k-th held event's NAME
MAX_EVENTS = 64  # an event index the driver believes; the window keeps real ones far below
ROOM = 28  # meta entries held at most, of a header's 32: the update's own numbers need a few


def base_name(name: str) -> str:
    """NAME for NAME/k with k in 2..MAX_EVENTS; any other name as it is (the network is
    untrusted: a name that only looks like one stays its own)."""
    base, sep, k = name.rpartition(SEP)
    if sep and k.isdigit() and k.isascii() and 2 <= int(k) <= MAX_EVENTS and base:
        return base
    return name


class Held:
    """The numbers of the events held since the last report, in order."""

    def __init__(self) -> None:
        self.events: list[dict[str, float]] = []
        self.names: set[str] = set()  # every NAME held, for a report that would repeat one

    def __bool__(self) -> bool:
        return bool(self.events)

    def entries(self) -> int:
        """The meta entries meta() makes."""
        return sum(len(e) for e in self.events)

    def fits(self, metrics: dict[str, float]) -> bool:
        """Whether one more event keeps meta() within ROOM entries and MAX_EVENTS events."""
        return self.entries() + len(metrics) <= ROOM and len(self.events) < MAX_EVENTS

    def add(self, metrics: dict[str, float]) -> None:
        self.events.append(dict(metrics))
        self.names.update(metrics)

    def meta(self) -> dict[str, float]:
        """The first event's numbers by name, the k-th's as NAME/k."""
        out: dict[str, float] = {}
        for k, event in enumerate(self.events, 1):
            suffix = "" if k == 1 else f"{SEP}{k}"
            out.update({name + suffix: value for name, value in event.items()})
        return out

    def clear(self) -> None:
        self.events.clear()
        self.names.clear()
