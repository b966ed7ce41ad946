"""Randomness belongs to the seed and the model's unit, never to a stage or a process: the same
network with dropout, the same seed, trains to the same parameters however it is cut, in process
and over real worker processes."""

from __future__ import annotations

import numpy as np
import pytest
import redis
import torch
from procs import batches, worker_state

from zdni.cluster import train_distributed
from zdni.config import RunConfig
from zdni.loop import load_data
from zdni.oracle import replay
from zdni.plan import plan
from zdni.rng import UnitStreams, unit_seed
from zdni.trainer import build_pipeline

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_thread")]

MODEL = '''
from torch import nn


def net():
    """Four units, three of them with dropout: every cut moves a dropout to another stage."""
    return nn.Sequential(
        nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.5)),
        nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.5)),
        nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.5)),
        nn.Sequential(nn.Linear(32, 10)),
    )
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The model file and a generated .npz (random features, random labels)."""
    root = tmp_path_factory.mktemp("rng")
    (root / "net.py").write_text(MODEL)
    g = np.random.default_rng(0)
    np.savez(root / "data.npz", x_train=g.normal(size=(256, 20)).astype(np.float32),
             y_train=g.integers(0, 10, 256), x_test=g.normal(size=(64, 20)).astype(np.float32),
             y_test=g.integers(0, 10, 64))
    return f"{root}/net.py:net", str(root / "data.npz")


def config(files: tuple[str, str], run_id: str, **changes: object) -> RunConfig:
    model, data = files
    base = dict(run_id=run_id, model=model, dataset=data, mode="backprop", epochs=1,
                batch_size=32, max_inflight=1, ring_size=4, checkpoint_every=0, lr=1e-2)
    base.update(changes)
    cfg = RunConfig(**base).validate()  # type: ignore[arg-type]
    plan(cfg, load_data(cfg))
    return cfg


def by_unit(states: list[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Parameters named by the model's unit ('3.0.weight'), from (first unit, stage state)."""
    out = {}
    for first, state in states:
        for name, value in state.items():
            local, rest = name.split(".", 1)
            out[f"{first + int(local)}.{rest}"] = value
    return out


def inproc(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The in-process reference's parameters after one epoch, named by unit."""
    pipeline = build_pipeline(cfg)
    replay(pipeline, batches(cfg))
    return by_unit([(s.module.first_unit, s.module.state_dict()) for s in pipeline])


def test_a_unit_draws_the_same_masks_wherever_it_runs() -> None:
    """A unit's stream is a function of (seed, unit) alone: a stage starting at unit 2 draws
    unit 2's masks whether it is the first stage or the third, and streams differ by unit."""
    from torch import nn

    def stage(first: int) -> nn.Sequential:
        module = nn.Sequential(nn.Dropout(0.5))
        module.first_unit = first
        return module

    x = torch.ones(4, 64)
    a = UnitStreams(3, stage(2)).forward(stage(2), x)
    b = UnitStreams(3, stage(2)).forward(stage(2), x)
    c = UnitStreams(3, stage(1)).forward(stage(1), x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert unit_seed(3, 2) != unit_seed(3, 1) and unit_seed(3, 2) != unit_seed(4, 2)


def test_backprop_with_dropout_gives_one_network_however_it_is_cut(
        files: tuple[str, str]) -> None:
    """Exact backprop of a network with dropout trains to the same parameters (bit for bit) in
    1, 2 or 4 stages in process: dropout masks follow the unit, not the stage."""
    one = inproc(config(files, "one", stages=1))
    two = inproc(config(files, "two", stages=2))
    four = inproc(config(files, "four", stages=4))
    assert one.keys() == two.keys() == four.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name
        assert torch.equal(one[name], four[name]), name


def test_distributed_four_stages_equal_two_in_process(files: tuple[str, str], redis_url: str,
                                                      redis_client: redis.Redis) -> None:
    """Four worker processes training the dropout network by exact backprop end with the
    parameters of the in-process run cut in two."""
    cfg = config(files, "rng-four", stages=4)
    train_distributed(cfg, quiet=True, redis_url=redis_url, threads=1)
    got = by_unit([(first, {k[len("stage."):]: v for k, v in
                            worker_state(redis_client, cfg.run_id, s).items()
                            if k.startswith("stage.")})
                   for s, first in zip(range(1, 5), (0, 1, 2, 3))])
    want = inproc(config(files, "two-again", stages=2))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
