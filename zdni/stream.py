"""A data set read lazily: a map-style torch Dataset through torch's DataLoader, one batch at a
time, with worker processes if asked, in a few batches of memory.

Batch `index` of epoch `epoch` is a pure function of (seed, epoch, index), whoever reads it
and wherever it starts: its samples are positions index*B..(index+1)*B-1 of the epoch's order
(a seeded permutation computed per position, zdni/permutation.py; the data's own order when
not shuffled), and every random draw the Dataset makes while reading them (augmentation:
torch, random and numpy) comes from generators seeded with (seed, epoch, index) for that batch
and put back after. So augmentation differs from epoch to epoch, the in-process and the
distributed runs see the same batches, DataLoader workers change nothing but speed, and a run
can start again at (epoch, position).

A Dataset's item is (x, y): x a tensor or array of the sample (float32 as it comes: normalize
in the Dataset), y a class index (int) or target values (float, bool: float32). Batches are
made by DataLoader's default collation.

An IterableDataset (a stream: no length, no index) is read by IterFeeder in this process, in
the stream's own order (shuffle in the stream), an epoch being one pass to the stream's end.
Batch `index` of epoch `epoch` is the next batch_size items of a fresh pass, read with the
generators seeded from (seed, epoch, index) as above: the same batches in process and
distributed for a stream that gives the same items for the same draws. It is read here and
not by DataLoader workers: each worker would read the whole stream unless it shards itself,
and the batches' order and sizes would then depend on the workers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data import default_collate as collate

from zdni.data import DataError
from zdni.permutation import Permutation

__all__ = ["IterFeeder", "StreamFeeder", "as_batch", "seeded"]

PREFETCH = 2  # batches each DataLoader worker reads ahead (DataLoader's own default)


class seeded:  # noqa: N801 - a context manager, named like torch.random.fork_rng
    """Every global generator a Dataset may draw from (torch, random, numpy), seeded from
    `key` inside the block and put back as it was after."""

    def __init__(self, key: int) -> None:
        self.key = key & (2**63 - 1)

    def __enter__(self) -> None:
        self.saved = (torch.random.get_rng_state(), random.getstate(), np.random.get_state())
        torch.manual_seed(self.key)
        random.seed(self.key)
        np.random.seed(self.key % 2**32)

    def __exit__(self, *exc: object) -> None:
        torch.random.set_rng_state(self.saved[0])
        random.setstate(self.saved[1])
        np.random.set_state(self.saved[2])


def batch_key(seed: int, epoch: int, index: int) -> int:
    """The seed of one batch's random draws (named by what it belongs to: seed, epoch, batch)."""
    return (seed * 1_000_003 + epoch) * 2_147_483_647 + index


def as_batch(samples: list[Any], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of a list of (x, y) items, collated: x float32, y int64 indices or float32."""
    try:
        x, y = collate(samples)
    except Exception as exc:
        raise DataError(f"{what}: its items are not (x, y) pairs that batch together "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dtype == torch.uint8 or not (x.is_floating_point()):
        raise DataError(f"{what}: its inputs are {x.dtype}; a streamed data set gives float "
                        "inputs, normalized in the Dataset (as torchvision's Normalize does)")
    if y.is_floating_point() or y.dtype == torch.bool:
        y = y.to(torch.float32)
    elif y.dtype.is_complex:
        raise DataError(f"{what}: its targets are {y.dtype}")
    else:
        y = y.to(torch.int64)
    return x.to(torch.float32).contiguous(), y.contiguous()


class _Batches(Dataset[tuple[int, torch.Tensor, torch.Tensor]]):
    """Reads whole batches by (epoch, index): DataLoader's 'samples' are our batches."""

    def __init__(self, dataset: Any, batch_size: int, seed: int, shuffle: bool,
                 what: str, drop_last: bool = False) -> None:
        self.dataset = dataset
        self.n = len(dataset)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.what = what
        self.drop_last = drop_last and self.n >= batch_size  # as zdni.data.BatchFeeder

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return math.ceil(self.n / self.batch_size)

    def positions(self, epoch: int, index: int) -> np.ndarray:
        start = index * self.batch_size
        pos = np.arange(start, min(start + self.batch_size, self.n), dtype=np.int64)
        if not self.shuffle:
            return pos
        return Permutation(self.n, self.seed * 1_000_003 + epoch)(pos)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, torch.Tensor, torch.Tensor]:
        epoch, index = key
        with seeded(batch_key(self.seed, epoch, index)):
            samples = [self.dataset[int(i)] for i in self.positions(epoch, index)]
        return (index, *as_batch(samples, self.what))


class _Keys(Sampler[tuple[int, int]]):
    """(epoch, index) of the batches start..count-1, in order."""

    def __init__(self, epoch: int, start: int, count: int) -> None:
        self.epoch, self.start, self.count = epoch, start, count

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in range(self.start, self.count))

    def __len__(self) -> int:
        return max(0, self.count - self.start)


class StreamFeeder:
    """Mini-batches of a map-style Dataset (module docstring); the interface of
    zdni.data.BatchFeeder: batches_per_epoch, iter_epoch(epoch, start)."""

    def __init__(self, dataset: Any, batch_size: int, seed: int, shuffle: bool = True,
                 workers: int = 0, what: str = "dataset", drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise DataError(f"{what}: cannot feed batches from an empty data set")
        self.batches = _Batches(dataset, batch_size, seed, shuffle, what, drop_last)
        self.workers = workers

    @property
    def batches_per_epoch(self) -> int:
        """Batches in an epoch, the last partial batch included (unless drop_last)."""
        return len(self.batches)

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) batch at `index` of the epoch's order, read here."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch index {index} out of range 0..{self.batches_per_epoch - 1}")
        _, x, y = self.batches[(epoch, index)]
        return x, y

    def iter_epoch(self, epoch: int, start: int = 0
                   ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (index, x, y) for the epoch's batches from `start` on, in order; with
        workers, DataLoader reads up to workers x PREFETCH batches ahead."""
        keys = _Keys(epoch, start, self.batches_per_epoch)
        if self.workers == 0:  # DataLoader would only add a copy: read in this process
            for key in keys:
                yield self.batches[key]
            return
        loader = DataLoader(self.batches, batch_size=None, sampler=keys,
                            num_workers=self.workers, prefetch_factor=PREFETCH,
                            multiprocessing_context="fork", persistent_workers=False)
        yield from loader


class IterFeeder:
    """Mini-batches of an IterableDataset (module docstring): the interface of StreamFeeder,
    with batches_per_epoch None (a pass ends where the stream does)."""

    batches_per_epoch: int | None = None

    def __init__(self, dataset: Any, batch_size: int, seed: int, what: str = "dataset",
                 drop_last: bool = False, count: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.what, self.drop_last, self.count = what, drop_last, count

    def iter_epoch(self, epoch: int, start: int = 0
                   ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (index, x, y) for a pass over the stream, from batch `start` on (the ones
        before it are read and dropped: a stream has no index); with drop_last, a last batch
        smaller than the others is left out."""
        items = iter(self.dataset)
        if self.count is not None:
            items = islice(items, self.count)
        index = 0
        while True:
            with seeded(batch_key(self.seed, epoch, index)):
                samples = list(islice(items, self.batch_size))
            if not samples:
                if index == 0:
                    raise DataError(f"{self.what}: the stream gave no items")
                return
            if len(samples) < self.batch_size and self.drop_last and index > 0:
                return
            if index >= start:
                yield (index, *as_batch(samples, self.what))
            index += 1
