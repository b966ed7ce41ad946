"""A run's data: its training, validation and test parts, each tensors in memory, a torch
Dataset read lazily or an IterableDataset read as a stream (zdni/stream.py), and the
validation part held out of the training set.

The loop feeds the training part's batches (a feeder: zdni.data.BatchFeeder for tensors,
zdni.stream.StreamFeeder for a Dataset) and evaluates the others batch by batch, so neither
runner holds more of a streamed data set than a few batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from zdni.data import BatchFeeder, DataError, Normalization
from zdni.permutation import Permutation
from zdni.stream import IterFeeder, StreamFeeder, as_batch, batch_key, seeded

__all__ = ["Data", "DatasetSplit", "IterSplit", "Split", "TensorSplit", "hold_out", "size"]

Pair = tuple[torch.Tensor, torch.Tensor]
Feeder = BatchFeeder | StreamFeeder | IterFeeder
VAL_KEY = 0x56414C  # names the validation split's permutation ("VAL"), apart from epochs'


@dataclass
class TensorSplit:
    """A part held in memory as (x, y) tensors."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    def probe(self, n: int) -> Pair:
        """The first n samples."""
        return self.x[:n], self.y[:n]

    def limit(self, n: int | None) -> TensorSplit:
        return self if n is None else TensorSplit(self.x[:n], self.y[:n])

    def feeder(self, batch_size: int, seed: int, shuffle: bool, workers: int,
               drop_last: bool = False) -> Feeder:
        return BatchFeeder(self.x, self.y, batch_size, seed, shuffle=shuffle, drop_last=drop_last)

    def eval_batches(self, batch_size: int, seed: int, workers: int) -> Iterator[Pair]:
        for start in range(0, len(self.x), batch_size):
            yield self.x[start : start + batch_size], self.y[start : start + batch_size]


class _View:
    """Samples of a Dataset through an index map (a prefix, or a part of a permutation)."""

    def __init__(self, dataset: Any, length: int, offset: int = 0,
                 order: Permutation | None = None) -> None:
        self.dataset, self.length, self.offset, self.order = dataset, length, offset, order

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.length:
            raise IndexError(i)
        pos = self.offset + i
        if self.order is not None:
            pos = int(self.order(np.array([pos]))[0])
        return self.dataset[pos]


@dataclass
class DatasetSplit:
    """A part read lazily from a map-style Dataset of (x, y) items."""

    dataset: Any
    what: str = "dataset"

    def __len__(self) -> int:
        return len(self.dataset)

    def probe(self, n: int) -> Pair:
        """The first n samples, read as a training batch's would be."""
        with seeded(batch_key(0, 0, 0)):
            return as_batch([self.dataset[i] for i in range(min(n, len(self)))], self.what)

    def limit(self, n: int | None) -> DatasetSplit:
        if n is None or n >= len(self):
            return self
        return DatasetSplit(_View(self.dataset, n), self.what)

    def feeder(self, batch_size: int, seed: int, shuffle: bool, workers: int,
               drop_last: bool = False) -> Feeder:
        return StreamFeeder(self.dataset, batch_size, seed, shuffle, workers, self.what,
                            drop_last)

    def eval_batches(self, batch_size: int, seed: int, workers: int) -> Iterator[Pair]:
        feeder = StreamFeeder(self.dataset, batch_size, seed, False, workers, self.what)
        for _, x, y in feeder.iter_epoch(0):
            yield x, y


@dataclass
class IterSplit:
    """A part read as a stream from an IterableDataset of (x, y) items: no length and no
    index, so no shuffling by zdni, no validation split held out of it and no DataLoader
    workers (zdni/stream.py); `count`: only its first items (a limit)."""

    dataset: Any
    what: str = "dataset"
    count: int | None = None

    def probe(self, n: int) -> Pair:
        """The stream's first n samples, read as a training batch's would be."""
        _, x, y = next(IterFeeder(self.dataset, n, 0, self.what, count=self.count
                                  ).iter_epoch(0))
        return x, y

    def limit(self, n: int | None) -> IterSplit:
        if n is None:
            return self
        return IterSplit(self.dataset, self.what, min(n, self.count or n))

    def feeder(self, batch_size: int, seed: int, shuffle: bool, workers: int,
               drop_last: bool = False) -> Feeder:
        return IterFeeder(self.dataset, batch_size, seed, self.what, drop_last, self.count)

    def eval_batches(self, batch_size: int, seed: int, workers: int) -> Iterator[Pair]:
        for _, x, y in IterFeeder(self.dataset, batch_size, seed, self.what,
                                  count=self.count).iter_epoch(0):
            yield x, y


Split = TensorSplit | DatasetSplit | IterSplit


def size(part: Split) -> int | None:
    """Samples in a part; None for a stream (its end is known when a pass reaches it)."""
    return None if isinstance(part, IterSplit) else len(part)


def hold_out(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(train, validation): a `fraction` of the training samples, chosen by a permutation
    seeded by `seed`, held out for validation (at least one sample on each side)."""
    if isinstance(train, IterSplit):
        raise DataError(f"{train.what} is a stream (an IterableDataset): no validation split "
                        "can be held out of it; give (train, val, test) from the factory or "
                        "--val-data")
    n = len(train)
    k = min(max(1, round(n * fraction)), n - 1)
    if n < 2:
        raise DataError(f"a validation split needs 2 or more training samples, got {n}")
    order = Permutation(n, seed * 1_000_003 + VAL_KEY)
    if isinstance(train, TensorSplit):
        idx = torch.from_numpy(order(np.arange(n)))
        val, rest = idx[:k], idx[k:].sort().values  # training keeps the data's order
        return TensorSplit(train.x[rest], train.y[rest]), TensorSplit(train.x[val], train.y[val])
    return (DatasetSplit(_View(train.dataset, n - k, k, order), train.what),
            DatasetSplit(_View(train.dataset, k, 0, order), f"{train.what} (validation)"))


@dataclass
class Data:
    """The run's parts; `ordered`: fed in order, unshuffled (chunks of sequences); `norm`: how
    raw inputs were made into these (zdni.data.reader_normalization's form), recorded beside
    the trained model (None: taken as they are)."""

    train: Split
    test: Split
    val: Split | None = None
    ordered: bool = False
    norm: Normalization | None = None

    @classmethod
    def of(cls, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
           y_test: torch.Tensor, ordered: bool = False, norm: Normalization | None = None
           ) -> Data:
        """Data held in memory."""
        return cls(TensorSplit(x_train, y_train), TensorSplit(x_test, y_test), None, ordered,
                   norm)

    def _tensors(self, part: Split) -> TensorSplit:
        if not isinstance(part, TensorSplit):
            raise DataError("this data set is read lazily: it has no tensors in memory")
        return part

    @property
    def x_train(self) -> torch.Tensor:
        return self._tensors(self.train).x

    @property
    def y_train(self) -> torch.Tensor:
        return self._tensors(self.train).y

    @property
    def x_test(self) -> torch.Tensor:
        return self._tensors(self.test).x

    @property
    def y_test(self) -> torch.Tensor:
        return self._tensors(self.test).y

    def steps_per_epoch(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches in an epoch: the last, partial one left out with `drop_last` (as the
        feeders leave it out; kept when it is the only one); 0 for a stream (unknown)."""
        if isinstance(self.train, IterSplit):
            return 0
        n = len(self.train)
        if drop_last and n >= batch_size:
            return n // batch_size
        return math.ceil(n / batch_size)
