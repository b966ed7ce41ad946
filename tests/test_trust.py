"""The trust gate (zdni/trust.py) and the method's default window (issue 22)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from zdni import methods
from zdni.config import ConfigError, RunConfig
from zdni.loop import load_data
from zdni.optim import Updater
from zdni.optimspec import stage_spec
from zdni.plan import plan
from zdni.trust import TrustGate


def test_the_gate_is_shut_until_a_true_gradient_came_back_then_follows_the_moving_cosine() -> None:
    gate = TrustGate(full=0.5, decay=0.9)
    assert gate.scale == 0.0
    gate.observe(0.2)
    assert gate.running == pytest.approx(0.2) and gate.scale == pytest.approx(0.4)
    gate.observe(1.0)
    assert gate.running == pytest.approx(0.9 * 0.2 + 0.1 * 1.0)
    assert gate.scale == pytest.approx(0.56)
    gate.observe(float("nan"))  # no direction: skipped
    assert gate.running == pytest.approx(0.28)
    for _ in range(200):
        gate.observe(0.9)
    assert gate.scale == 1.0  # capped
    for _ in range(200):
        gate.observe(-0.5)
    assert gate.scale == 0.0  # a synthetic gradient against the truth: no step at all


def test_the_gate_refuses_settings_outside_its_range() -> None:
    with pytest.raises(ValueError, match="full"):
        TrustGate(full=0.0)
    with pytest.raises(ValueError, match="decay"):
        TrustGate(decay=1.0)
    with pytest.raises(ConfigError, match="trust_gate"):
        RunConfig(trust_gate=1.5).validate()


def test_a_gated_update_is_the_same_update_at_the_scaled_rate_and_the_schedule_goes_on() -> None:
    """SGD without momentum: the step is exactly lr * scale * grad; the schedule (step decay)
    reads the unscaled rate; a backup of the updater carries the gate."""
    cfg = RunConfig(optimizer="sgd", momentum=0.0, lr=0.1, lr_schedule="step", lr_gamma=0.5,
                    lr_step_size=1, epoch_batches=10)
    w = nn.Parameter(torch.ones(3))
    up = Updater(stage_spec(cfg), [w])
    up.gate = TrustGate(full=1.0)
    up.gate.observe(0.25)
    w.grad = torch.tensor([1.0, 2.0, 4.0])
    up.step()
    torch.testing.assert_close(w.detach(), torch.ones(3) - 0.1 * 0.25 * torch.tensor([1.0, 2.0, 4.0]))
    assert up.lr == pytest.approx(0.05)  # the schedule stepped from 0.1, not from 0.025
    again = Updater(stage_spec(cfg), [nn.Parameter(torch.ones(3))])
    again.gate = TrustGate(full=1.0)
    again.load_state_dict(up.state_dict())
    assert again.gate.running == pytest.approx(0.25) and again.updates == 1


def test_only_stages_that_update_from_m_with_batches_in_flight_are_gated() -> None:
    from zdni.trainer import build_pipeline

    sg = build_pipeline(RunConfig(mode="sg", stages=3))
    assert [s.gate is not None for s in sg] == [True, True, False]
    assert all(s.gate is None for s in build_pipeline(RunConfig(mode="sg", trust_gate=0)))
    # one batch in flight: M's targets are fresh, the paper's DNI, ungated
    assert all(s.gate is None for s in build_pipeline(RunConfig(mode="sg", max_inflight=1)))
    assert all(s.gate is None for s in build_pipeline(RunConfig(mode="backprop")))
    full = build_pipeline(RunConfig(mode="full", stages=2, trust_gate=0.5))
    assert full[0].gate is not None and math.isclose(full[0].gate.full, 0.5)


def test_dni_defaults_to_two_in_flight_and_the_other_methods_to_four() -> None:
    assert RunConfig(mode="sg").inflight == RunConfig(mode="full").inflight == 2
    assert RunConfig(mode="pipedream").inflight == RunConfig(mode="backprop").inflight == 4
    assert RunConfig(mode="sg", max_inflight=6).inflight == 6
    assert methods.get("sg").largest_window(RunConfig(mode="sg")) == 2
    assert methods.get("backprop").largest_window(RunConfig(mode="backprop")) == 1
    with pytest.raises(ConfigError, match=r"ring_size \(N=2\) must exceed max_inflight \(K=2\)"):
        RunConfig(mode="sg", ring_size=2).validate()
    RunConfig(mode="sg", ring_size=3).validate()


@pytest.mark.parametrize(("mode", "window", "warned"),
                         [("sg", 4, True), ("full", 3, True), ("sg", 2, False), ("sg", None, False),
                          ("pipedream", 8, False)])
def test_a_dni_window_above_two_is_warned_of_once(mnist_dir: Path, mode: str,
                                                  window: int | None, warned: bool,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cfg = RunConfig(mode=mode, max_inflight=window, data_dir=str(mnist_dir), train_limit=256,
                    test_limit=100).validate()
    with caplog.at_level("WARNING", logger="zdni.driver"):
        plan(cfg, load_data(cfg))
    said = [r.getMessage() for r in caplog.records if "--max-inflight" in r.getMessage()]
    if not warned:
        assert said == []
        return
    assert said == [f"[driver] --max-inflight {window}: {mode}'s accuracy can fall with more "
                    "than 2 batches in flight (an MLP with LayerNorm: 95.0% at 1, 93.3% at 2, "
                    "90.9% at 4 with the trust gate, 21% without; docs/RESULTS.md)"]
