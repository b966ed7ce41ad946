"""Tests of one stage's compute in every mode, and of the in-process reference trainer (the
algorithm itself against an independent DNI: tests/test_algorithm.py)."""


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


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(n)]


def test_backprop_stages_equal_single_process_pytorch() -> None:
    """Backprop through stage events gives the parameters of plain single-model PyTorch."""
    cfg = RunConfig(mode="backprop", stages=3, lr=1e-2)
    pipeline = build_pipeline(cfg)
    reference = nn.Sequential(*build_stages(cfg))
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2, fused=True)
    runner = Oracle(pipeline)
    for x, y in batches(4):
        runner.feed(x, y)
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()
    for a, b in zip([p for s in pipeline for p in s.module.parameters()], reference.parameters()):
        torch.testing.assert_close(a, b)


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
