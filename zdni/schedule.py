"""The order of stage events for one iteration with one batch in flight (a pure function)."""

from __future__ import annotations

from typing import Literal

Event = tuple[Literal["batch", "input", "grad"], int]


def iteration_events(mode: str, stages: int) -> list[Event]:
    """Events of one iteration, in the order the in-process reference applies them.

    Each stage sees its own events in the same order a worker sees them through the broker with
    one batch in flight; events of different stages touch different state, so this order gives
    the distributed pipeline's result exactly.

    backprop: forward 1..S, then gradients S-1..1.
    sg:       stage i's input, then (for i > 1) stage i-1's gradient, which i has just produced.
    full:     first every stage 2..S updates from its synthetic input, then as sg.
    """
    if mode == "backprop":
        return [("input", i) for i in range(1, stages + 1)] + [
            ("grad", i) for i in range(stages - 1, 0, -1)
        ]
    events: list[Event] = []
    if mode == "full":
        events += [("batch", i) for i in range(2, stages + 1)]
    for i in range(1, stages + 1):
        events.append(("input", i))
        if i > 1:
            events.append(("grad", i - 1))
    return events
