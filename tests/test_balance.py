"""Cuts balanced by measurement: the pure split on injected costs, and a real profile."""

from __future__ import annotations

import pytest
from torch import nn

from zdni.balance import Costs, param_costs, profile, split, stage_costs
from zdni.config import RunConfig

# (unit costs, M cost at each boundary, stages, expected cuts)
CASES = [
    ("even costs share out evenly", [1, 1, 1, 1, 1, 1], None, 3, [2, 4]),
    ("one wide unit stands alone", [1, 1, 8, 1, 1, 1], None, 3, [2, 3]),
    ("the wide unit first", [8, 1, 1, 1, 1, 1], None, 2, [1]),
    ("one stage takes everything", [3, 1, 2], None, 1, []),
    ("as many stages as units", [3, 1, 2], None, 3, [1, 2]),
    ("an expensive M at a boundary moves the cut off it",
     [2, 2, 2, 2], [0, 0, 9, 0, 0], 2, [1]),
]


@pytest.mark.parametrize("units,exit,stages,cuts", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_split_minimizes_the_slowest_stage(units, exit, stages, cuts) -> None:
    """split chooses the cut of each table row, and no other cut has a faster slowest stage."""
    costs = Costs(units, exit)
    assert split(costs, stages) == cuts
    import itertools

    best = min(max(stage_costs(costs, list(c)))
               for c in itertools.combinations(range(1, len(units)), stages - 1))
    assert max(stage_costs(costs, cuts)) == best


def test_balanced_cut_beats_the_even_cut_on_an_unbalanced_model() -> None:
    """With one wide unit among narrow ones, the balanced cut's slowest stage costs less than
    the even cut's (costs as a profile would measure them, injected)."""
    costs = Costs([1.0, 1.0, 1.0, 6.0, 1.0, 1.0], [0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0])
    even = [2, 4]
    chosen = split(costs, 3)
    assert max(stage_costs(costs, chosen)) < max(stage_costs(costs, even))


def test_split_refuses_more_stages_than_units() -> None:
    """Four stages of three units cannot be cut."""
    with pytest.raises(ValueError, match="cannot cut 3 units into 4 stages"):
        split(Costs([1, 1, 1]), 4)


@pytest.mark.usefixtures("one_thread")
def test_profile_measures_the_wide_unit_as_the_costliest() -> None:
    """A real profile on this CPU: a 2048-wide layer costs more than 64-wide ones, and in sg
    mode a boundary's synthesizer costs what its width makes it (M of a 2048-wide boundary has
    ~900 times the weights of a 64-wide one's). On one thread, as `zdni train --balance time`
    measures on this 2-core machine (cores / stages): with torch's two, a loaded machine made
    every unit wait ~38 ms for its OpenMP team and the two widest look alike."""
    units: list[nn.Module] = [nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU()),
                              nn.Sequential(nn.Linear(64, 2048), nn.ReLU()),
                              nn.Sequential(nn.Linear(2048, 2048), nn.ReLU()),
                              nn.Sequential(nn.Linear(2048, 64), nn.ReLU()),
                              nn.Sequential(nn.Linear(64, 10))]
    cfg = RunConfig(mode="sg", batch_size=64)
    costs = profile(cfg, units, (1, 28, 28))
    assert costs.units.index(max(costs.units)) == 2
    assert min(costs.exit[2], costs.exit[3]) > max(costs.exit[1], costs.exit[4])
    assert param_costs(units).units[2] == 2048 * 2048 + 2048
