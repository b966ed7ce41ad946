"""Tests of one stage's compute in every mode, and of the in-process reference trainer."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zdni.buffer import MemoryRing
from zdni.config import RunConfig
from zdni.models import build_stages
from zdni.oracle import Oracle
from zdni.stage import StageError
from zdni.trainer import build_pipeline


class OracleM(nn.Module):
    """A gradient 'synthesizer' that returns the true gradient it was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # lets the stage train it like a real M
        self.grad: torch.Tensor | None = None

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        assert self.grad is not None
        return self.grad + 0 * self.dummy


def true_boundary_grads(stages: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """dL/dh_i at every stage boundary, by plain backprop on a copy of the stages."""
    work = copy.deepcopy(stages)
    outs = []
    h = x
    for stage in work:
        h = stage(h)
        h.retain_grad()
        outs.append(h)
    F.cross_entropy(h, y).backward()
    return [o.grad.detach() for o in outs[:-1]]


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(n)]


def test_sg_with_oracle_gradients_equals_backprop() -> None:
    """sg mode whose M returns the true gradient makes exactly backprop's parameter updates."""
    cfg = RunConfig(mode="sg", stages=3, lr=1e-2)
    pipeline = build_pipeline(cfg)
    oracles = []
    for stage in pipeline[:-1]:
        assert stage.local is not None
        stage.local.M = OracleM()
        stage.local.m_opt = torch.optim.Adam(stage.local.M.parameters(), lr=1e-3)
        oracles.append(stage.local.M)
    reference = nn.Sequential(*build_stages(cfg))
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    runner = Oracle(pipeline)
    for x, y in batches(5):
        grads = true_boundary_grads([s.module for s in pipeline], x, y)
        for oracle, g in zip(oracles, grads):
            oracle.grad = g
        runner.feed(x, y)
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()
    got = [p for s in pipeline for p in s.module.parameters()]
    for a, b in zip(got, reference.parameters()):
        torch.testing.assert_close(a, b)


def test_backprop_stages_equal_single_process_pytorch() -> None:
    """Backprop through stage events gives the parameters of plain single-model PyTorch."""
    cfg = RunConfig(mode="backprop", stages=3, lr=1e-2)
    pipeline = build_pipeline(cfg)
    reference = nn.Sequential(*build_stages(cfg))
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    runner = Oracle(pipeline)
    for x, y in batches(4):
        runner.feed(x, y)
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()
    for a, b in zip([p for s in pipeline for p in s.module.parameters()], reference.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["sg", "full"])
def test_synthesizers_learn(mode: str) -> None:
    """M's L2 loss against the gradients sent back falls; in full mode I's input loss falls too."""
    cfg = RunConfig(mode=mode, stages=3, conditioned=True, synth_lr=1e-3)
    pipeline = build_pipeline(cfg)
    data = batches(8)
    first, last = {}, {}
    runner = Oracle(pipeline)
    for it in range(120):
        x, y = data[it % len(data)]
        done = runner.feed(x, y)
        metrics = {k: v for _, out in done for k, v in out.metrics.items()}
        (first if it < 8 else last).update(metrics)
    assert last["grad_loss"] < first["grad_loss"]
    if mode == "full":
        assert last["input_loss"] < first["input_loss"]


def test_frozen_stage_keeps_its_weights() -> None:
    """--freeze-stage 1 leaves the first stage at its initial weights while others move."""
    cfg = RunConfig(mode="full", stages=3, freeze_stage=1)
    pipeline = build_pipeline(cfg)
    before = [p.clone() for p in pipeline[0].module.parameters()]
    before_last = [p.clone() for p in pipeline[2].module.parameters()]
    runner = Oracle(pipeline)
    for x, y in batches(3):
        runner.feed(x, y)
    for a, b in zip(before, pipeline[0].module.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(before_last, pipeline[2].module.parameters()))


def test_memory_ring_keeps_only_matching_iterations() -> None:
    """A slot answers only for the iteration stored in it; the ring holds at most N slots."""
    ring = MemoryRing(4)
    for it in range(10):
        ring.put(it, {"h": torch.full((1,), float(it))})
    assert ring.get(9)["h"].item() == 9.0
    assert ring.get(5) is None  # overwritten by 9
    assert ring.get(6)["h"].item() == 6.0
    assert len(ring.slots) == 4


def test_late_gradient_of_an_overwritten_slot_is_an_error() -> None:
    """A gradient whose slot was overwritten raises StageError instead of training on a mismatch."""
    cfg = RunConfig(mode="sg", stages=2, ring_size=2, max_inflight=1)
    pipeline = build_pipeline(cfg)
    x, y = batches(1)[0]
    for it in range(3):
        pipeline[0].train_input(it, x)
    with pytest.raises(StageError, match="overwritten"):
        pipeline[0].train_grad(0, torch.zeros(16, 256))
    pipeline[0].train_grad(2, torch.zeros(16, 256))
