"""Tests of the model zoo and how models are cut into stages."""

import pytest
import torch
from torch import nn

from zdni.config import ConfigError, RunConfig
from zdni.models import INPUT_SHAPES, build_stages, build_units, cut, cut_points, stage_shapes

MODELS = [("seed-mlp", "mnist", 2), ("fcn3", "mnist", 3), ("fcn6", "mnist", 6),
          ("seed-cnn", "cifar10", 6), ("dni-cnn", "cifar10", 4)]


@pytest.mark.parametrize(("model", "dataset", "units"), MODELS)
def test_stages_composed_equal_the_whole_model(model: str, dataset: str, units: int) -> None:
    """For every stage count, composing the stages gives the whole model's output and parameters."""
    torch.manual_seed(0)
    whole = nn.Sequential(*build_units(model)).eval()
    x = torch.randn(4, *INPUT_SHAPES[dataset])
    expected = whole(x)
    for stages in range(1, units + 1):
        parts = cut(list(whole), cut_points(units, stages))
        assert len(parts) == stages
        h = x
        for part in parts:
            h = part(h)
        torch.testing.assert_close(h, expected, rtol=0, atol=0)
        n_params = sum(p.numel() for part in parts for p in part.parameters())
        assert n_params == sum(p.numel() for p in whole.parameters())


@pytest.mark.parametrize(
    ("units", "stages", "cuts", "expected"),
    [(3, 3, None, [0, 1, 2]), (4, 3, None, [0, 1, 2]), (4, 2, None, [0, 2]),
     (5, 3, None, [0, 1, 3]), (6, 4, None, [0, 1, 2, 4]), (6, None, [2, 5], [0, 2, 5]),
     (3, 1, None, [0])],
)
def test_cut_points_table(units: int, stages: int | None, cuts: list[int] | None,
                          expected: list[int]) -> None:
    """Units are shared out evenly with later stages taking the extra ones, or cut where told."""
    assert cut_points(units, stages, cuts) == expected


@pytest.mark.parametrize(("stages", "cuts"), [(0, None), (4, None), (None, [0]), (None, [2, 1]),
                                               (None, [3])])
def test_bad_cuts_are_clear_errors(stages: int | None, cuts: list[int] | None) -> None:
    """A cut outside the model or a stage count it cannot hold raises ConfigError."""
    with pytest.raises(ConfigError):
        cut_points(3, stages, cuts)


def test_build_stages_is_deterministic_by_seed() -> None:
    """Two processes building the same config get the same weights; another seed differs."""
    a = build_stages(RunConfig(seed=3))
    b = build_stages(RunConfig(seed=3))
    c = build_stages(RunConfig(seed=4))
    for pa, pb in zip(a[0].parameters(), b[0].parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(a[0].parameters()), next(c[0].parameters()))


def test_stage_shapes_probe_leaves_batchnorm_untouched() -> None:
    """Probing shapes reports every boundary and does not move BatchNorm running statistics."""
    stages = build_stages(RunConfig(model="fcn3", stages=3))
    before = stages[0][0][2].running_mean.clone()
    assert stage_shapes(stages, (1, 28, 28)) == [(1, 28, 28), (256,), (256,), (10,)]
    assert torch.equal(stages[0][0][2].running_mean, before)
    cnn = build_stages(RunConfig(model="dni-cnn", dataset="cifar10", stages=4))
    assert stage_shapes(cnn, (3, 32, 32))[1:] == [(128, 16, 16), (128, 8, 8), (128, 8, 8), (10,)]


def test_zoo_models_take_a_width() -> None:
    """fcnK's hidden width and the CNNs' channels are model arguments; anything else, or a
    width that is not a whole number, is a one-line ConfigError."""
    from zdni.config import ConfigError
    from zdni.models import build_units

    wide = build_units("fcn8", {"width": 1024})
    assert len(wide) == 8
    assert [m.out_features for u in wide for m in u.modules() if isinstance(m, nn.Linear)] == \
        [1024] * 7 + [10]
    assert sum(p.numel() for p in build_units("dni-cnn", {"channels": 16})[0].parameters()) == \
        3 * 16 * 25 + 16 + 2 * 16
    with pytest.raises(ConfigError, match="takes only width, not depth"):
        build_units("fcn4", {"depth": 3})
    with pytest.raises(ConfigError, match="takes no model arguments"):
        build_units("seed-mlp", {"width": 3})
    with pytest.raises(ConfigError, match="whole number"):
        build_units("fcn4", {"width": "wide"})
