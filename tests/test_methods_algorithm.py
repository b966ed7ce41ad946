"""The decoupling methods against plain PyTorch (tests/pipeline_reference.py): pipedream and ddg
(delayed true gradients at the weights of the forward), fr (the forward replayed at the newest
weights) and dgl (local losses), run through the in-process W-window oracle, equal the
independent reference exactly at windows 1, 2 and 4."""

from __future__ import annotations

import copy

import pytest
import torch
from pipeline_reference import delayed, greedy

from zdni.config import RunConfig
from zdni.oracle import Oracle
from zdni.stage import Stage
from zdni.trainer import build_pipeline

LR = 1e-2


def batches(n: int, seed: int = 0, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n)]


def pipeline(mode: str, window: int, stages: int = 3, **changes: object) -> list[Stage]:
    """fcn3 of width 32 (BatchNorm, no dropout) in `stages` stages."""
    cfg = RunConfig(mode=mode, stages=stages, lr=LR, max_inflight=window, ring_size=window + 4,
                    model_args={"width": 32}, **changes)  # type: ignore[arg-type]
    return build_pipeline(cfg.validate())


def assert_same(stages: list[Stage], fs: list[torch.nn.Module]) -> None:
    """Every parameter and BatchNorm statistic of every stage, exactly."""
    for stage, f in zip(stages, fs):
        mine, theirs = stage.module.state_dict(), f.state_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0,
                                       msg=f"stage {stage.index} {key}")


def run(stages: list[Stage], data: list, window: int, drain_every: int = 0) -> None:
    oracle = Oracle(stages, window)
    for x, y in data:
        oracle.feed(x, y)
        if drain_every and oracle.fed % drain_every == 0:
            oracle.drain()
    oracle.drain()


@pytest.mark.parametrize("mode", ["pipedream", "ddg", "fr"])
@pytest.mark.parametrize("window", [1, 2, 4])
def test_delayed_gradients_equal_the_reference(mode: str, window: int) -> None:
    """Ten batches with W in flight, drained once midway: every stage's parameters and
    BatchNorm statistics equal the plain-PyTorch pipeline whose stage k updates with the
    gradient of batch t - W + 1 taken at the weights that forwarded it (fr: at the newest)."""
    stages = pipeline(mode, window)
    fs = [copy.deepcopy(s.module) for s in stages]
    data = batches(10)
    run(stages, data, window, drain_every=5)
    delayed(fs, data, window, LR, replay_features=mode == "fr", drain_every=5)
    assert_same(stages, fs)


def test_stashed_and_replayed_gradients_differ_with_batches_in_flight() -> None:
    """At W = 2 the stash matters: fr (newest weights) ends apart from pipedream and ddg,
    which end equal (the same updates, one keeping graphs, the other inputs)."""
    data = batches(6)
    ends = {}
    for mode in ("pipedream", "ddg", "fr"):
        stages = pipeline(mode, 2)
        run(stages, data, 2)
        ends[mode] = [s.module for s in stages]
    assert_same_modules(ends["pipedream"], ends["ddg"])
    with pytest.raises(AssertionError):
        assert_same_modules(ends["pipedream"], ends["fr"])


def test_ddg_recomputes_the_forward_with_its_own_dropout_masks() -> None:
    """An MLP with dropout at W = 3: ddg, which recomputes each forward when its gradient comes,
    ends equal to pipedream, which kept the forward's graph (and so its masks)."""
    def units() -> list[torch.nn.Module]:
        torch.manual_seed(3)
        return [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32)),
                torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 32)),
                torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 10))]

    data = batches(6)
    ends = {}
    for mode in ("pipedream", "ddg"):
        cfg = RunConfig(mode=mode, stages=3, lr=LR, max_inflight=3, ring_size=7).validate()
        stages = build_pipeline(cfg, units=units())
        run(stages, data, 3)
        ends[mode] = [s.module for s in stages]
    assert_same_modules(ends["pipedream"], ends["ddg"])


def assert_same_modules(a: list[torch.nn.Module], b: list[torch.nn.Module]) -> None:
    for x, y in zip(a, b):
        for (key, u), v in zip(x.state_dict().items(), y.state_dict().values()):
            torch.testing.assert_close(u, v, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("window", [1, 4])
def test_greedy_stages_equal_the_reference(window: int) -> None:
    """Ten batches: every stage and auxiliary head equals plain-PyTorch greedy training (one
    Adam step per stage and head on the head's loss, the last stage on the network's), whatever
    the window."""
    stages = pipeline("dgl", window)
    fs = [copy.deepcopy(s.module) for s in stages]
    heads = [copy.deepcopy(s.head) for s in stages]
    data = batches(10)
    run(stages, data, window)
    greedy(fs, heads, data, LR)
    assert_same(stages, fs)
    for stage, head in zip(stages, heads):
        if head is not None:
            for (key, a), b in zip(stage.head.state_dict().items(), head.state_dict().values()):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"head {stage.index} {key}")
