"""The in-flight window's rules, table-driven, without sockets or clocks (zdni/window.py)."""

from __future__ import annotations

import pytest

from zdni.window import Window

# Each case: a script of events on a 3-stage window of size 2, lost after 10 s, 3 tries, and
# what must hold after it. Events: ("feed", now) | ("done", it, stage) | ("lost", now)
# | ("drop", [its], reason) | ("fail", stage).
CASES = [
    ("feeding fills the window",
     [("feed", 0), ("feed", 0)],
     {"inflight": [0, 1], "full": True, "fed": 2}),
    ("an iteration finishes when every stage reported it",
     [("feed", 0), ("done", 0, 1), ("done", 0, 2), ("done", 0, 3)],
     {"inflight": [], "full": False, "last_done": {1: 0, 2: 0, 3: 0}}),
    ("two stages are not enough",
     [("feed", 0), ("done", 0, 1), ("done", 0, 3)],
     {"inflight": [0], "last_done": {1: 0, 2: -1, 3: 0}}),
    ("a report of an iteration not in flight changes nothing",
     [("feed", 0), ("done", 7, 1), ("done", 0, 9)],
     {"inflight": [0], "last_done": {1: -1, 2: -1, 3: -1}}),
    ("nothing is lost before lost_s",
     [("feed", 0), ("lost", 10)],
     {"lost": None, "streak": 0}),
    ("past lost_s an iteration is lost; the stages that never reported it are named",
     [("feed", 0), ("feed", 5), ("done", 0, 2), ("lost", 11)],
     {"lost": ([0], [1, 3], False), "streak": 1}),
    ("a lost iteration dropped is fed again as a new one",
     [("feed", 0), ("lost", 11), ("drop", [0], "lost"), ("feed", 11)],
     {"inflight": [1], "replay": 1, "tally": {"fed": 2, "dropped:lost": 1, "replayed": 1}}),
    ("more losses in a row than tries: stuck",
     [("feed", 0), ("lost", 11), ("lost", 12), ("lost", 13), ("lost", 14)],
     {"lost": ([0], [1, 2, 3], True), "streak": 4}),
    ("a finished iteration resets the losses in a row",
     [("feed", 0), ("feed", 0), ("lost", 11), ("lost", 12), ("lost", 13),
      ("done", 1, 1), ("done", 1, 2), ("done", 1, 3), ("lost", 14)],
     {"lost": ([0], [1, 2, 3], False), "streak": 1}),
    ("a failed stage loses what it has not finished, not what it has",
     [("feed", 0), ("feed", 0), ("done", 0, 2), ("done", 1, 1), ("fail", 2)],
     {"inflight": [0], "replay": 1, "tally": {"dropped:stage_failed": 1}}),
    ("lags count iterations fed and not finished by each stage",
     [("feed", 0), ("feed", 0), ("done", 0, 1), ("done", 1, 1), ("done", 0, 2)],
     {"lags": {1: 0, 2: 1, 3: 2}, "behind": [2, 3]}),
]


@pytest.mark.parametrize("script,expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_window_rules(script: list[tuple], expect: dict) -> None:
    """Each script of events leaves the window as its table row says."""
    w = Window(stages=3, size=2, lost_s=10.0, tries=3)
    lost = None
    for event in script:
        if event[0] == "feed":
            w.feed(f"batch{w.fed}", event[1])
        elif event[0] == "done":
            w.done(event[1], event[2])
        elif event[0] == "lost":
            lost = w.lost(event[1])
        elif event[0] == "drop":
            w.drop(event[1], event[2])
        elif event[0] == "fail":
            w.drop(w.unfinished_by(event[1]), "stage_failed")
    checks = {
        "inflight": lambda: w.inflight,
        "full": w.full,
        "fed": lambda: w.fed,
        "last_done": lambda: w.last_done,
        "lost": lambda: None if lost is None else (lost.iterations, lost.behind, lost.stuck),
        "streak": lambda: w.lost_streak,
        "replay": lambda: len(w.replay),
        "tally": lambda: {k: w.tally[k] for k in expect["tally"]},
        "lags": w.lags,
        "behind": w.behind,
    }
    for name, want in expect.items():
        assert checks[name]() == want, name


def test_replayed_batch_is_the_lost_one() -> None:
    """The batch queued for replay is exactly the batch the lost iteration was fed with."""
    w = Window(stages=2, size=4, lost_s=1.0)
    w.feed("a", 0.0)
    w.feed("b", 0.5)
    w.drop([1], "lost")
    assert list(w.replay) == ["b"]
