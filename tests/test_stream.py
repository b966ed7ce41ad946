"""Tests of data read lazily (zdni.stream, zdni.permutation, zdni.split): batches a pure
function of (seed, epoch, index) with or without DataLoader workers, augmentation per epoch,
resuming at a position, the validation split, and a Dataset given by a factory with arguments."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from zdni.config import RunConfig
from zdni.data import DataError
from zdni.loop import load_data
from zdni.permutation import Permutation
from zdni.split import DatasetSplit, TensorSplit, hold_out
from zdni.stream import StreamFeeder


class Noisy(Dataset):
    """Sample i is i itself plus augmentation drawn from torch, random and numpy."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        noise = torch.rand(1).item() + random.random() + float(np.random.rand())
        return torch.tensor([float(i), noise]), i % 3


def epoch(feeder: StreamFeeder, e: int, start: int = 0) -> list[tuple[int, torch.Tensor,
                                                                        torch.Tensor]]:
    return [(int(i), x, y) for i, x, y in feeder.iter_epoch(e, start)]


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000, 4099])
def test_the_permutation_is_a_bijection(n: int) -> None:
    """Every position maps to a distinct sample of range(n); keys give different orders."""
    got = Permutation(n, 5)(np.arange(n))
    assert sorted(got.tolist()) == list(range(n))
    if n > 7:
        assert got.tolist() != Permutation(n, 6)(np.arange(n)).tolist()


def test_workers_change_nothing_but_speed() -> None:
    """Two DataLoader workers give the batches (augmentation included) of the driver alone; an
    epoch covers every sample once, the next epoch another order and other augmentation; the
    caller's own random streams are left as they were."""
    before = torch.random.get_rng_state()
    alone = StreamFeeder(Noisy(50), 8, seed=3, workers=0)
    workers = StreamFeeder(Noisy(50), 8, seed=3, workers=2)
    first = epoch(alone, 0)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (i, x, y), (j, x2, y2) in zip(first, epoch(workers, 0), strict=True):
        assert i == j and torch.equal(x, x2) and torch.equal(y, y2)
    ids = torch.cat([x[:, 0] for _, x, _ in first]).long()
    assert sorted(ids.tolist()) == list(range(50)) and ids.tolist() != list(range(50))
    second = torch.cat([x for _, x, _ in epoch(alone, 1)])
    assert not torch.equal(second[:, 0].long(), ids)
    same = torch.cat([x for _, x, _ in epoch(alone, 0)])
    assert torch.equal(same, torch.cat([x for _, x, _ in first]))  # the same (seed, epoch)


def test_an_epoch_resumes_at_a_position() -> None:
    """Reading an epoch from batch 3 gives the batches a full read gives from there."""
    feeder = StreamFeeder(Noisy(40), 6, seed=1)
    full, tail = epoch(feeder, 2), epoch(feeder, 2, start=3)
    assert [i for i, _, _ in tail] == [3, 4, 5, 6]
    for (i, x, y), (j, x2, y2) in zip(full[3:], tail, strict=True):
        assert i == j and torch.equal(x, x2) and torch.equal(y, y2)


def test_items_are_checked_as_they_are_batched() -> None:
    """uint8 inputs of a streamed set are refused (normalize in the Dataset), in one line."""
    class Raw(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.zeros(3, dtype=torch.uint8), 0

    with pytest.raises(DataError, match="normalized in the Dataset"):
        StreamFeeder(Raw(), 2, seed=0).batch(0, 0)


def test_hold_out_is_seeded_and_disjoint() -> None:
    """The validation split takes its fraction by seed, apart from the training samples, the
    same way for tensors and for a Dataset read lazily."""
    x = torch.arange(100.0).unsqueeze(1)
    train, val = hold_out(TensorSplit(x, torch.zeros(100, dtype=torch.int64)), 0.1, seed=4)
    assert isinstance(train, TensorSplit) and isinstance(val, TensorSplit)
    assert (len(train), len(val)) == (90, 10)
    seen = set(train.x[:, 0].long().tolist())
    assert seen.isdisjoint(val.x[:, 0].long().tolist())
    lazy_train, lazy_val = hold_out(DatasetSplit(Noisy(100)), 0.1, seed=4)
    assert [int(lazy_val.dataset[i][0][0]) for i in range(10)] == val.x[:, 0].long().tolist()
    assert len(lazy_train) == 90
    again = hold_out(TensorSplit(x, torch.zeros(100, dtype=torch.int64)), 0.1, seed=5)[1]
    assert isinstance(again, TensorSplit) and not torch.equal(again.x, val.x)


FACTORY = '''
import torch
from torch.utils.data import Dataset


class Indexed(Dataset):
    def __init__(self, n, width):
        self.n, self.width = n, width

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((self.width,), float(i)), i % 2


def make(n=100, width=3):
    return Indexed(n, width), Indexed(10, width)
'''


def test_a_factory_takes_arguments_and_its_dataset_streams(tmp_path: Path) -> None:
    """--dataset-arg reaches the factory; its Dataset is read lazily (not held in memory),
    limited and split for validation as tensors are."""
    (tmp_path / "gen.py").write_text(FACTORY)
    cfg = RunConfig(dataset=f"{tmp_path}/gen.py:make", dataset_args={"n": 1000, "width": 5},
                    val_split=0.1, train_limit=500).validate()
    data = load_data(cfg)
    assert isinstance(data.train, DatasetSplit) and isinstance(data.test, DatasetSplit)
    assert (len(data.train), len(data.val or []), len(data.test)) == (450, 50, 10)
    x, y = data.train.probe(4)
    assert x.shape == (4, 5) and y.dtype == torch.int64
    with pytest.raises(DataError, match="no tensors in memory"):
        _ = data.x_train
