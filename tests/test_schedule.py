"""Tests of the W-window order of stage events (zdni/schedule.py): written-out tables, and a
simulated driver that shows the order never needs more than W iterations in flight."""

from __future__ import annotations

import pytest

from zdni import methods
from zdni.schedule import Cursor, Event, Turns, next_drain
from zdni.stage import Wiring


def order(cursor: Cursor, limit: int = 100) -> str:
    """The cursor's whole segment, written as 'input0 grad0 ...'."""
    out = []
    while (event := cursor.peek()) is not None and len(out) < limit:
        cursor.advance()
        out.append(f"{event[0]}{event[1]}")
    return " ".join(out)


@pytest.mark.parametrize(
    ("window", "batch", "grad", "table"),
    [
        (1, False, True, "input0 grad0 input1 grad1 input2 grad2"),  # sg, one in flight
        (1, True, True, "batch0 input0 grad0 batch1 input1 grad1 batch2 input2 grad2"),  # full
        (1, False, False, "input0 input1 input2"),  # the last stage
        (2, False, True, "input0 input1 grad0 input2 grad1 grad2"),
        (3, False, True, "input0 input1 input2 grad0 grad1 grad2"),
        (4, False, True, "input0 input1 input2 grad0 grad1 grad2"),  # the window outruns 3
        (2, True, True, "batch0 batch1 input0 batch2 input1 grad0 input2 grad1 grad2"),
        (2, True, False, "batch0 batch1 input0 batch2 input1 input2"),
    ],
)
def test_segment_orders(window: int, batch: bool, grad: bool, table: str) -> None:
    """A stage's events of a 3-iteration segment come in the written-out order."""
    assert order(Cursor(window, batch, grad, start=0, end=3)) == table


def test_a_segment_starts_where_the_last_ended() -> None:
    """After a drain the order starts again at the next iteration, the gradients caught up."""
    cursor = Cursor(2, False, True, start=0, end=2)
    assert order(cursor) == "input0 input1 grad0 grad1"
    cursor.begin(2, 4)
    assert order(cursor) == "input2 input3 grad2 grad3"


def test_an_open_segment_waits_at_what_depends_on_its_end() -> None:
    """With the end unknown the order goes on; once known, it finishes at it."""
    cursor = Cursor(3, False, True)
    assert order(cursor, limit=7) == "input0 input1 input2 grad0 input3 grad1 input4"
    cursor.end = 5
    assert order(cursor) == "grad2 grad3 grad4"


def test_staleness_of_a_gradient_is_how_far_the_stage_ran_past_it() -> None:
    """Each gradient of a window-W order is W - 1 iterations old, but at the segment's end."""
    cursor = Cursor(3, False, True, start=0, end=5)
    ages = []
    while (event := cursor.peek()) is not None:
        if event[0] == "grad":
            ages.append(cursor.staleness(event[1]))
        cursor.advance()
    assert ages == [2, 2, 2, 1, 0]


def test_next_drain_is_an_epoch_end_or_an_evaluation() -> None:
    """The loop drains at every epoch's end and, with eval_every, at each of its multiples."""
    assert [next_drain(t, 10) for t in (0, 9, 10, 11)] == [10, 10, 20, 20]
    assert [next_drain(t, 10, 4) for t in (0, 4, 8, 9, 10)] == [4, 8, 10, 10, 12]


def test_turns_hold_early_events_and_release_them_in_order() -> None:
    """A worker's held events come out in the oracle's order, whatever order they arrived in."""
    turns = Turns(Cursor(2, False, True), per_epoch=3)
    turns.add(("grad", 0), "g0")
    assert list(turns.due()) == []  # input0 and input1 come first
    turns.add(("input", 1))
    assert list(turns.due()) == []
    turns.add(("input", 0))
    assert [e for e, _ in turns.due()] == [("input", 0), ("input", 1), ("grad", 0)]
    turns.add(("grad", 2), "g2")
    turns.add(("grad", 1), "g1")
    turns.add(("input", 2))
    assert [e for e, _ in turns.due()] == [("input", 2), ("grad", 1), ("grad", 2)]
    turns.add(("input", 3))  # the next epoch's first iteration
    assert [e for e, _ in turns.due()] == [("input", 3)]


def test_turns_end_a_segment_at_a_checkpoint_and_start_where_a_resumed_stage_left_off() -> None:
    """A checkpoint the loop takes mid-epoch ends the segment there (the held gradients run
    without waiting for later inputs; finished() says when); a resumed stage starts at the
    iteration after its backup's, not at 0, and the next segment still ends at the epoch's end."""
    turns = Turns(Cursor(3, False, True), per_epoch=10)
    for t in range(4):
        turns.add(("input", t))
    turns.add(("grad", 2), "g2")
    turns.add(("grad", 3), "g3")
    turns.add(("grad", 0), "g0")
    turns.add(("grad", 1), "g1")
    assert [e for e, _ in turns.due()] == [("input", 0), ("input", 1), ("input", 2), ("grad", 0),
                                           ("input", 3), ("grad", 1)]
    assert not turns.finished(3)
    turns.end_at(4)  # checkpoint at iteration 3: grad 2 and grad 3 need no input 4 and 5
    assert [e for e, _ in turns.due()] == [("grad", 2), ("grad", 3)]
    assert turns.finished(3) and turns.cursor.end == 10
    resumed = Turns(Cursor(3, False, True), per_epoch=10)
    resumed.start_at(4)
    resumed.add(("input", 4))
    assert [e for e, _ in resumed.due()] == [("input", 4)]
    assert (resumed.cursor.start, resumed.cursor.end) == (4, 10)


def simulate(wirings: list[Wiring], window: int, iterations: int, per_epoch: int) -> int:
    """Run the orders of every stage against a driver that keeps at most `window` iterations in
    flight and drains at each epoch's end; returns the most in flight at once. Fails on a
    deadlock (no stage can take its next event and the driver cannot feed)."""
    cursors = [Cursor(window, w.batch_event, w.grad_event, 0, next_drain(0, per_epoch))
               for w in wirings]
    taken: set[tuple[int, Event]] = set()
    fed, finished, most = 0, 0, 0

    def ready(i: int, event: Event) -> bool:
        kind, t = event
        if kind == "batch" or (kind == "input" and i == 1):
            return t < fed
        if kind == "input":
            return (i - 1, ("input", t)) in taken
        return (i + 1, (wirings[i].grad_from, t)) in taken  # wirings[i]: stage i + 1's

    def done(t: int) -> bool:
        return all((i, (w.done_on, t)) in taken for i, w in enumerate(wirings, start=1))

    while finished < iterations:
        moved = False
        segment_end = next_drain(finished, per_epoch) if fed == finished else \
            next_drain(fed - 1, per_epoch)
        while fed < min(iterations, segment_end) and fed - finished < window:
            fed += 1
            moved = True
        most = max(most, fed - finished)
        for i, cursor in enumerate(cursors, start=1):
            while (event := cursor.peek()) is not None and ready(i, event):
                cursor.advance()
                taken.add((i, event))
                moved = True
            if event is None and cursor.end is not None and cursor.end < iterations:
                cursor.begin(cursor.end, next_drain(cursor.end, per_epoch))
                moved = True
        while finished < fed and done(finished):
            finished += 1
            moved = True
        assert moved, f"deadlock at fed {fed}, finished {finished}"
    return most


@pytest.mark.parametrize("mode", ["backprop", "sg", "full"])
@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("window", [1, 2, 4, 7])
def test_every_order_runs_within_its_window(mode: str, count: int, window: int) -> None:
    """Each method's orders, for any stage count and window, need at most the window in flight
    and never deadlock, drains at epoch ends included; a wide enough window fills."""
    method = methods.get(mode)
    w = min(window, method.window or window)
    wirings = [method.wiring(i, count) for i in range(1, count + 1)]
    most = simulate(wirings, w, iterations=30, per_epoch=10)
    assert most == w
