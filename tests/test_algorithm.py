"""The algorithm, not the plumbing: zdni's stages against an independent plain-PyTorch DNI
(tests/dni_reference.py) one step and many steps, at windows 1, 2 and 4; full mode and sg with
perfect synthesizers against backprop; what M learns against the true gradient. These are the
fast algorithm tests that scripts/mutate.py requires to fail for every wrong version of DNI."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dni_reference import dni
from torch import nn

from zdni.config import RunConfig
from zdni.data import load_dataset
from zdni.models import build_stages
from zdni.oracle import Oracle, replay
from zdni.stage import Stage
from zdni.synthesizer import GradientSynthesizer
from zdni.trainer import build_pipeline

LR, SYNTH_LR = 1e-2, 1e-3


def batches(n: int, seed: int = 0, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n)]


def pipeline(mode: str, conditioned: bool, stages: int = 3, window: int = 1,
             gate: float = 0.0) -> list[Stage]:
    """fcn3 (no dropout) in `stages` stages, its synthesizers moved off zero so that every
    target and every label matters from the first step; `gate`: the trust gate (0 = off)."""
    cfg = RunConfig(mode=mode, conditioned=conditioned, stages=stages, lr=LR, synth_lr=SYNTH_LR,
                    max_inflight=window, ring_size=window + 4, trust_gate=gate)
    stages_ = build_pipeline(cfg)
    g = torch.Generator().manual_seed(1)
    for stage in stages_:
        for part in (stage.M, stage.I):
            if part is not None:
                for p in part.parameters():
                    p.data.add_(0.01 * torch.randn(p.shape, generator=g))
    return stages_


def reference_of(stages: list[Stage]) -> tuple[list[nn.Module], list, list]:
    """Independent copies of the stages' modules, Ms and Is, before any training."""
    return ([copy.deepcopy(s.module) for s in stages], [copy.deepcopy(s.M) for s in stages],
            [copy.deepcopy(s.I) for s in stages])


def assert_same(stages: list[Stage], fs: list[nn.Module], Ms: list, Is: list) -> None:
    for stage, f, M, inp in zip(stages, fs, Ms, Is):
        for name, mine, theirs in (("stage", stage.module, f), ("M", stage.M, M),
                                   ("I", stage.I, inp)):
            assert (mine is None) == (theirs is None), f"stage {stage.index} {name}"
            if mine is None:
                continue
            for (key, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
                torch.testing.assert_close(a, b, msg=f"stage {stage.index} {name}.{key}")


@pytest.mark.parametrize(("mode", "conditioned"), [("sg", False), ("sg", True), ("full", False),
                                                   ("full", True)])
def test_one_step_of_every_synthesizer_is_one_adam_step_on_its_true_target(
        mode: str, conditioned: bool) -> None:
    """After one iteration each M equals one Adam step on mse(M0(h, y), target) with the target
    the next stage's own gradient of its synthetic (or loss) backward; each I one Adam step on
    mse(I0(x, y), the true input); each stage one step on its synthetic gradient."""
    stages = pipeline(mode, conditioned)
    fs, Ms, Is = reference_of(stages)
    data = batches(1)
    replay(stages, data)
    dni(fs, Ms, Is, data, 1, LR, SYNTH_LR, conditioned)
    assert_same(stages, fs, Ms, Is)


@pytest.mark.parametrize("window", [1, 2, 4])
@pytest.mark.parametrize(("mode", "conditioned"), [("sg", False), ("sg", True), ("full", True)])
def test_many_steps_with_batches_in_flight_equal_the_papers_dni(mode: str, conditioned: bool,
                                                                window: int) -> None:
    """Seven iterations with W in flight (M's targets W - 1 iterations late, I's passes W - 1
    ahead) leave every stage, M and I where the independent DNI leaves them."""
    stages = pipeline(mode, conditioned, window=window)
    fs, Ms, Is = reference_of(stages)
    data = batches(7)
    replay(stages, data, window)
    dni(fs, Ms, Is, data, window, LR, SYNTH_LR, conditioned)
    assert_same(stages, fs, Ms, Is)


@pytest.mark.parametrize(("mode", "conditioned", "window"),
                         [("sg", False, 4), ("sg", True, 2), ("sg", True, 4), ("full", True, 4)])
def test_the_trust_gate_scales_each_step_as_the_reference_does(mode: str, conditioned: bool,
                                                               window: int) -> None:
    """With the trust gate, 25 iterations with W in flight leave everything where the
    independent DNI with its own gate leaves it; on these random batches M agrees little with
    the truth, so a gate fully open at cosine 0.05 keeps some stage's steps strictly between
    none and full."""
    stages = pipeline(mode, conditioned, window=window, gate=0.05)
    fs, Ms, Is = reference_of(stages)
    data = batches(25)
    replay(stages, data, window)
    dni(fs, Ms, Is, data, window, LR, SYNTH_LR, conditioned, gate=0.05)
    assert_same(stages, fs, Ms, Is)
    scales = [s.gate.scale for s in stages if s.gate is not None]
    assert len(scales) == 2 and any(0 < c < 1 for c in scales), scales


class PerfectM(GradientSynthesizer):
    """A gradient 'synthesizer' that returns the true gradient it was handed."""

    def __init__(self) -> None:
        super().__init__((1,), 0, 1, False)
        self.grad: torch.Tensor | None = None

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        assert self.grad is not None
        return self.grad + 0 * self.net[-1].bias.sum()


class PerfectI(nn.Module):
    """An input 'synthesizer' that returns the true input it was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.value: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        assert self.value is not None
        return self.value + 0 * self.dummy


def true_signals(modules: list[nn.Module], x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every stage's input and the gradient of every stage's output, by plain backprop on a
    copy of the stages as they are now."""
    work = copy.deepcopy(modules)
    ins, outs = [], []
    h = x
    for stage in work:
        ins.append(h.detach())
        h = stage(h)
        h.retain_grad()
        outs.append(h)
    F.cross_entropy(h, y).backward()
    return ins, [o.grad.detach() for o in outs[:-1]]


@pytest.mark.parametrize("mode", ["sg", "full"])
def test_perfect_synthesizers_make_backprops_updates(mode: str) -> None:
    """sg whose M returns the true gradient, and full mode whose I also returns the true input,
    make exactly backprop's parameter updates (one batch in flight)."""
    cfg = RunConfig(mode=mode, stages=3, lr=LR, max_inflight=1, trust_gate=0)
    stages = build_pipeline(cfg)
    Ms, Is = [], []
    for stage in stages:
        assert stage.local is not None
        if stage.M is not None:
            stage.local.M = PerfectM()
            stage.local.m_opt = torch.optim.Adam(stage.local.M.parameters(), lr=1e-3, fused=True)
        Ms.append(stage.local.M)
        if stage.I is not None:
            stage.local.I = PerfectI()
            stage.local.i_opt = torch.optim.Adam(stage.local.I.parameters(), lr=1e-3, fused=True)
        Is.append(stage.local.I)
    reference = nn.Sequential(*build_stages(cfg))
    opt = torch.optim.Adam(reference.parameters(), lr=LR, fused=True)
    runner = Oracle(stages)
    for x, y in batches(5):
        ins, grads = true_signals([s.module for s in stages], x, y)
        for M, g in zip(Ms, grads):
            if M is not None:
                M.grad = g
        for inp, h in zip(Is, ins):
            if inp is not None:
                inp.value = h
        runner.feed(x, y)
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()
    got = [p for s in stages for p in s.module.parameters()]
    for a, b in zip(got, reference.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.usefixtures("one_thread")
def test_m_learns_the_true_gradient_of_a_fixed_network(mnist_dir: Path) -> None:
    """With the stages held fixed, each cDNI M trained for a while on MNIST predicts the true
    gradient of a batch it never saw far better than zero does (cosine > 0.45, error < 0.9 of
    the true gradient's norm, where predicting zero scores 1), the bootstrapped M too."""
    stages = build_pipeline(RunConfig(mode="sg", conditioned=True, stages=3, synth_lr=1e-5))
    for stage in stages:
        stage.updater = stage.opt = None  # fixed stages: only the synthesizers learn
    x_all, y_all = load_dataset("mnist", str(mnist_dir), True, False, 2048)
    runner = Oracle(stages)
    for it in range(600):
        a = it % 31 * 64
        runner.feed(x_all[a : a + 64], y_all[a : a + 64])
    x, y = x_all[1984:], y_all[1984:]
    ins, grads = true_signals([s.module for s in stages], x, y)
    for stage, h_in, g in zip(stages[:-1], ins[1:], grads):
        assert stage.M is not None
        with torch.no_grad():
            guess = stage.M(h_in, y)
        cosine = F.cosine_similarity(guess.flatten(), g.flatten(), dim=0).item()
        error = ((guess - g).norm() / g.norm()).item()
        assert cosine > 0.45 and error < 0.9, (stage.index, cosine, error)
