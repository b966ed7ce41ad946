"""Tests of the one-in-flight event order, against written-out tables."""

import pytest

from zdni.schedule import iteration_events


@pytest.mark.parametrize(
    ("mode", "stages", "table"),
    [
        ("backprop", 3, "input1 input2 input3 grad2 grad1"),
        ("backprop", 1, "input1"),
        ("sg", 3, "input1 input2 grad1 input3 grad2"),
        ("sg", 2, "input1 input2 grad1"),
        ("full", 3, "batch2 batch3 input1 input2 grad1 input3 grad2"),
    ],
)
def test_events_table(mode: str, stages: int, table: str) -> None:
    """Each mode's events of one iteration come in the written-out order."""
    assert " ".join(f"{kind}{i}" for kind, i in iteration_events(mode, stages)) == table
