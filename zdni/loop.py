"""The one training loop: epochs of batches through a runner, evaluation, metrics, the summary.

Both ways of running share it: the in-process runner (zdni/trainer.py, the reference) and the
distributed one (zdni/driver.py, over the broker). The loop decides *what* happens and in which
order; a runner decides *how* a batch reaches the stages and how their reports come back, and
hands every stage report to the one aggregator, MetricsWriter.observe.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from zdni.config import DATASETS, RunConfig, parse_copy_data
from zdni.data import BatchFeeder, load_dataset
from zdni.errors import ZdniError
from zdni.metrics import MetricsWriter
from zdni.progress import Progress
from zdni.sequence import copy_chunks
from zdni.summary import build_summary

__all__ = ["Data", "RunError", "Runner", "load_data", "score", "train"]


class RunError(ZdniError, RuntimeError):
    """The run cannot go on: a stage died, stalled or never started. The message says which."""


class Data(NamedTuple):
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    ordered: bool = False  # fed in order, unshuffled: chunks of sequences (copy-L*-T*)


class Runner(Protocol):
    """How batches reach the stages. `fed` counts the iterations fed so far."""

    name: str  # the summary's "runner"
    label: str  # the progress bar's label
    stages: int

    @property
    def fed(self) -> int:
        """Iterations fed so far."""
        ...

    def replays(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches lost on the way, to be fed again before the next one (none in process)."""
        ...

    def feed(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Start the next iteration once the window has room; returns `fed`."""
        ...

    def drain(self) -> None:
        """Return once no iteration is in flight."""
        ...

    def settle(self) -> None:
        """Feed every batch waiting to be fed again, then drain."""
        ...

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[float, float]:
        """(mean test loss, test accuracy) of the current parameters."""
        ...

    def flight(self) -> tuple[int | None, dict[int, int] | None]:
        """Iterations in flight and each stage's lag, for the metrics (None where none)."""
        ...

    def progress(self) -> dict[str, Any]:
        """Extra fields of the progress bar."""
        ...

    def epoch_end(self, epoch: int, accuracy: float) -> None:
        """An epoch was evaluated (the distributed runner records it in Redis)."""
        ...

    def summary_extra(self) -> dict[str, Any]:
        """Runner-specific fields of the summary."""
        ...


def score(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy and the count of correct predictions of one evaluation batch. With
    labels shaped per sample (a chunk of a sequence's outputs), a sample is correct when every
    one of its positions is, and its loss is the sum over them."""
    y = y.to(logits.device)
    right = (logits.argmax(1) == y).reshape(len(y), -1).all(dim=1)
    return F.cross_entropy(logits, y, reduction="sum").item(), int(right.sum())


def load_data(cfg: RunConfig, download: bool = False) -> Data:
    """The run's training and test sets (cached per process: a second call is free): a zoo
    dataset from cfg.data_dir, or a user's file or factory (zdni/userdata.py)."""
    copy = parse_copy_data(cfg.dataset)
    if copy:  # generated: sequence batches of chunks, in order (zdni.sequence.copy_chunks)
        length, T = copy
        chunks = -(-(2 * length + 1) // T)
        per_batch = chunks * cfg.batch_size
        train = max(1, (cfg.train_limit or 100 * per_batch) // per_batch)
        test = max(1, (cfg.test_limit or 10 * per_batch) // per_batch)
        x_train, y_train = copy_chunks(train, cfg.batch_size, length, T, seed=cfg.seed)
        x_test, y_test = copy_chunks(test, cfg.batch_size, length, T, seed=cfg.seed + 10_007)
        return Data(x_train, y_train, x_test, y_test, ordered=True)
    if cfg.dataset in DATASETS:
        x_train, y_train = load_dataset(cfg.dataset, cfg.data_dir, True, download,
                                        cfg.train_limit)
        x_test, y_test = load_dataset(cfg.dataset, cfg.data_dir, False, download, cfg.test_limit)
        return Data(x_train, y_train, x_test, y_test)
    from zdni.userdata import load_user_dataset

    (x_train, y_train), (x_test, y_test) = load_user_dataset(cfg.dataset)
    a, b = cfg.train_limit, cfg.test_limit
    return Data(x_train[:a], y_train[:a], x_test[:b], y_test[:b])


def train(cfg: RunConfig, runner: Runner, data: Data, metrics: MetricsWriter,
          quiet: bool = False) -> dict[str, Any]:
    """Train cfg.epochs epochs through `runner`; returns the summary."""
    feeder = BatchFeeder(data.x_train, data.y_train, cfg.batch_size, cfg.seed,
                         shuffle=not data.ordered)
    per_epoch = feeder.batches_per_epoch
    progress = Progress(per_epoch * cfg.epochs, runner.label, quiet=quiet)
    history: list[dict[str, Any]] = []
    start = time.monotonic()
    samples = 0
    accuracy: float | None = None

    def step(x: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
        nonlocal samples, accuracy
        it = runner.feed(x, y)
        samples += len(x)
        metrics.iteration(it, epoch + 1, samples, time.monotonic() - start, *runner.flight())
        if cfg.eval_every and it % cfg.eval_every == 0 and it % per_epoch:
            runner.drain()  # evaluate the parameters of one iteration, not a mix
            result = runner.evaluate(data.x_test, data.y_test, epoch)
            _, accuracy = metrics.eval(it, epoch + 1, time.monotonic() - start, *result)
        progress.update(it, epoch=epoch + 1, loss=metrics.last_loss, acc=accuracy,
                        sps=round(samples / max(time.monotonic() - start, 1e-9)),
                        **runner.progress())

    for epoch in range(cfg.epochs):
        for _, xb, yb in feeder.iter_epoch(epoch):
            for rx, ry in runner.replays():
                step(rx, ry, epoch)
            step(xb, yb, epoch)
        runner.settle()
        test_loss, accuracy = runner.evaluate(data.x_test, data.y_test, epoch)
        history.append(metrics.epoch(epoch + 1, test_loss, accuracy, time.monotonic() - start,
                                     runner.fed, samples))
        runner.epoch_end(epoch + 1, accuracy)
    progress.close()
    wall = time.monotonic() - start
    return build_summary(cfg, runner.stages, history, runner.fed, samples, wall,
                         runner=runner.name, extra=runner.summary_extra())
