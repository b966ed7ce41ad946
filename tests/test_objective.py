"""Tests of zdni.objective: the default and a user's loss and metric, their goal, the targets
the wire accepts for a run, and cDNI conditioned on float targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zdni.config import ConfigError, RunConfig
from zdni.objective import Objective, check_targets
from zdni.protocol import MessageError
from zdni.synthesizer import GradientSynthesizer
from zdni.usercode import UserCodeError, check_named

USER = '''
import torch


def mae(out, y):
    return (out - y).abs().mean()


mae.higher_is_better = False


def r2(out, y):
    return 1 - ((out - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()


def vector(out, y):
    return (out - y).abs()
'''


@pytest.fixture
def user(tmp_path: Path) -> str:
    """A file of metrics a user wrote."""
    (tmp_path / "fns.py").write_text(USER)
    return str(tmp_path / "fns.py")


def test_the_default_is_cross_entropy_and_accuracy() -> None:
    """Without settings: cross-entropy, accuracy (higher is better), and the evaluation sums
    of per-position labels count a sample right only when all its positions are."""
    obj = Objective()
    assert (obj.metric, obj.goal) == ("accuracy", "max")
    out = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[2.0, 2.0], [0.0, 0.0]]])  # (B=2, C=2, T=2)
    y = torch.tensor([[0, 1], [0, 1]])
    loss_sum, right = obj.score(out, y)
    assert right == 1.0
    assert loss_sum == pytest.approx(float(F.cross_entropy(out, y, reduction="sum")))


def test_a_user_loss_and_metric_by_reference(user: str) -> None:
    """--loss torch.nn.functional:mse_loss and --metric FILE:mae: the batch means times the
    samples; the goal comes from mae.higher_is_better; an nn.Module class is instantiated."""
    obj = Objective("torch.nn.functional:mse_loss", f"{user}:mae")
    out, y = torch.zeros(4, 1), torch.full((4, 1), 2.0)
    assert obj.loss(out, y).item() == 4.0
    assert obj.score(out, y) == (16.0, 8.0)
    assert (obj.metric, obj.goal) == ("mae", "min")
    assert Objective("torch.nn:L1Loss").loss(out, y).item() == 2.0
    assert Objective("torch.nn:L1Loss").metric == "loss"  # the metric defaults to the loss


def test_a_metric_must_say_which_way_is_better(user: str) -> None:
    """A user's metric without higher_is_better needs --metric-goal, said in one line."""
    with pytest.raises(ConfigError, match="--metric-goal max or min"):
        Objective("torch.nn.functional:mse_loss", f"{user}:r2")
    assert Objective("torch.nn.functional:mse_loss", f"{user}:r2", "max").goal == "max"


def test_a_loss_or_metric_of_the_wrong_kind_is_named(user: str) -> None:
    """A loss that is not a scalar, or a metric that is not one number, is a UserCodeError."""
    out, y = torch.zeros(4, 1), torch.ones(4, 1)
    with pytest.raises(UserCodeError, match="expected a scalar tensor"):
        Objective(f"{user}:vector").loss(out, y)
    with pytest.raises(UserCodeError, match="expected a finite number"):
        Objective("torch.nn.functional:mse_loss", f"{user}:vector", "min").score(out, y)


def test_float_targets_need_a_loss_that_takes_them() -> None:
    """Float targets with cross-entropy or accuracy are refused, naming what to pass."""
    with pytest.raises(ConfigError, match="cross-entropy needs class indices: give your loss"):
        RunConfig(target_dtype="float32").validate()
    with pytest.raises(ConfigError, match="accuracy needs class indices"):
        RunConfig(target_dtype="float32", loss="torch.nn.functional:mse_loss",
                  metric="accuracy").validate()


def test_the_wire_takes_the_runs_targets_and_refuses_others() -> None:
    """A float run takes float32 targets of its shape and refuses class indices; a class run
    refuses floats and out-of-range classes."""
    floats = RunConfig(target_dtype="float32", label_shape=[3],
                       loss="torch.nn.functional:mse_loss").validate()
    assert check_targets(torch.randn(5, 3), 5, floats).shape == (5, 3)
    for bad, reason in ((torch.zeros(5, 3, dtype=torch.int64), "dtype"),
                        (torch.randn(5, 2), "shape"), (torch.randn(4, 3), "shape")):
        with pytest.raises(MessageError) as info:
            check_targets(bad, 5, floats)
        assert info.value.reason == reason
    classes = RunConfig(classes=10).validate()
    with pytest.raises(MessageError):
        check_targets(torch.randn(5), 5, classes)
    with pytest.raises(MessageError, match="within 0..9"):
        check_targets(torch.full((5,), 10), 5, classes)


def test_cdni_conditions_on_float_targets_themselves() -> None:
    """M conditioned on float targets appends their values: two targets that differ give two
    predictions that differ, of flat and of image activations."""
    for shape in ((16,), (4, 3, 3)):
        m = GradientSynthesizer(shape, 0, 8, conditioned=True, classes=1, labels=2)
        torch.nn.init.normal_(m.net[-1].weight)
        h = torch.randn(3, *shape)
        a = m(h, torch.zeros(3, 2))
        b = m(h, torch.ones(3, 2))
        assert a.shape == h.shape and not torch.allclose(a, b)


def test_a_worker_imports_only_the_loss_its_operator_named() -> None:
    """A run's loss by reference is refused unless named; torch's own losses need no naming."""
    check_named("torch.nn.functional:mse_loss", frozenset(), "[stage 3]", "--loss")
    check_named("torch.nn:BCEWithLogitsLoss", frozenset(), "[stage 3]", "--loss")
    check_named("cross_entropy", frozenset(), "[stage 3]", "--loss")
    check_named("fns.py:mae", frozenset({"fns.py:mae"}), "[stage 3]", "--metric")
    with pytest.raises(UserCodeError, match="start the worker with --loss evil.py:fn"):
        check_named("evil.py:fn", frozenset({"fns.py:mae"}), "[stage 3]", "--loss")
    with pytest.raises(UserCodeError, match="--loss os:system"):
        check_named("os:system", frozenset(), "[stage 3]", "--loss")
