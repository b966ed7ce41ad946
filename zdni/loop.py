"""The one training loop: epochs of batches through a runner, evaluation, metrics, the summary.

Both ways of running share it: the in-process runner (zdni/trainer.py, the reference) and the
distributed one (zdni/driver.py, over the broker). The loop decides *what* happens and in which
order; a runner decides *how* a batch reaches the stages and how their reports come back, and
hands every stage report to the one aggregator, MetricsWriter.observe.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from zdni.config import DATASETS, RunConfig, parse_copy_data
from zdni.data import BatchFeeder, Normalization, load_dataset, reader_normalization
from zdni.errors import ZdniError
from zdni.metrics import MetricsWriter
from zdni.progress import Progress
from zdni.sequence import copy_chunks
from zdni.summary import build_summary

__all__ = ["Data", "LoopState", "RunError", "Runner", "Saver", "State", "load_data", "score",
           "train"]

State = tuple[dict[str, torch.Tensor], dict[str, Any]]  # one stage's tensors and metadata


class RunError(ZdniError, RuntimeError):
    """The run cannot go on: a stage died, stalled or never started. The message says which."""


class Data(NamedTuple):
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    ordered: bool = False  # fed in order, unshuffled: chunks of sequences (copy-L*-T*)
    # How raw inputs were made into these (zdni.data.reader_normalization's form), recorded
    # beside the trained model; None: taken as they are.
    norm: Normalization | None = None


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

    def start_at(self, fed: int) -> None:
        """Number the next iteration `fed`: a resumed run goes on from its checkpoint."""
        ...

    def snapshot(self) -> dict[int, State] | None:
        """With nothing in flight, every stage's state at the last iteration fed (endpoint ->
        zdni.checkpoint.stage_state), or None when the stages did not all confirm one."""
        ...


@dataclass
class LoopState:
    """Where the loop stands between two batches: what continuing a run needs besides the
    stages' own states (zdni/resume.py writes it beside them). The batches themselves need no
    state: BatchFeeder's order is a pure function of (seed, epoch)."""

    epoch: int = 0  # the epoch in progress, 0-based (== epochs done when position is 0)
    position: int = 0  # the next batch of that epoch
    fed: int = 0  # iterations fed so far: the next iteration's number
    samples: int = 0  # training samples fed so far
    wall_s: float = 0.0  # training time so far, seconds
    accuracy: float | None = None  # the newest test accuracy
    history: list[dict[str, Any]] = field(default_factory=list)  # the summary's epoch rows
    metrics: dict[str, Any] = field(default_factory=dict)  # MetricsWriter.state()


class Saver(Protocol):
    """Keeps a resumable checkpoint of the run (zdni.resume.Checkpointer)."""

    def due(self, fed: int) -> bool:
        """Whether a checkpoint is due after `fed` iterations (epoch ends always are)."""
        ...

    def save(self, runner: Runner, state: LoopState, metrics: MetricsWriter) -> None:
        """Take every stage's state from the runner and write it with `state`."""
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
        return Data(x_train, y_train, x_test, y_test, norm=reader_normalization(cfg.dataset))
    from zdni.userdata import load_user_dataset, user_normalization

    (x_train, y_train), (x_test, y_test) = load_user_dataset(cfg.dataset)
    a, b = cfg.train_limit, cfg.test_limit
    return Data(x_train[:a], y_train[:a], x_test[:b], y_test[:b],
                norm=user_normalization(cfg.dataset))


def train(cfg: RunConfig, runner: Runner, data: Data, metrics: MetricsWriter,
          quiet: bool = False, start: LoopState | None = None,
          saver: Saver | None = None) -> dict[str, Any]:
    """Train cfg.epochs epochs through `runner`; returns the summary. From `start` (a resumed
    run: the runner's stages already hold its checkpoint), else from the beginning; `saver`
    checkpoints when it is due and at every epoch's end."""
    feeder = BatchFeeder(data.x_train, data.y_train, cfg.batch_size, cfg.seed,
                         shuffle=not data.ordered)
    per_epoch = feeder.batches_per_epoch
    state = start or LoopState()
    if start is not None:
        runner.start_at(start.fed)
        metrics.restore(start.metrics, start.fed, start.epoch + 1)
    progress = Progress(per_epoch * cfg.epochs, runner.label, quiet=quiet)
    began = time.monotonic() - state.wall_s  # a resumed run's wall time goes on counting

    def step(x: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
        it = runner.feed(x, y)
        state.samples += len(x)
        metrics.iteration(it, epoch + 1, state.samples, time.monotonic() - began,
                          *runner.flight())
        if cfg.eval_every and it % cfg.eval_every == 0 and it % per_epoch:
            runner.drain()  # evaluate the parameters of one iteration, not a mix
            result = runner.evaluate(data.x_test, data.y_test, epoch)
            _, state.accuracy = metrics.eval(it, epoch + 1, time.monotonic() - began, *result)
        progress.update(it, epoch=epoch + 1, loss=metrics.last_loss, acc=state.accuracy,
                        sps=round(state.samples / max(time.monotonic() - began, 1e-9)),
                        **runner.progress())

    def checkpoint(epoch: int, position: int) -> None:
        assert saver is not None
        state.epoch, state.position = epoch, position
        state.wall_s = time.monotonic() - began
        saver.save(runner, state, metrics)

    first_epoch, first_batch = state.epoch, state.position
    for epoch in range(first_epoch, cfg.epochs):
        for index in range(first_batch if epoch == first_epoch else 0, per_epoch):
            for rx, ry in runner.replays():
                step(rx, ry, epoch)
            step(*feeder.batch(epoch, index), epoch)
            if saver is not None and index + 1 < per_epoch and saver.due(runner.fed):
                checkpoint(epoch, index + 1)
        runner.settle()
        test_loss, state.accuracy = runner.evaluate(data.x_test, data.y_test, epoch)
        state.history.append(metrics.epoch(epoch + 1, test_loss, state.accuracy,
                                           time.monotonic() - began, runner.fed, state.samples))
        runner.epoch_end(epoch + 1, state.accuracy)
        if saver is not None:
            checkpoint(epoch + 1, 0)
    progress.close()
    wall = time.monotonic() - began
    return build_summary(cfg, runner.stages, state.history, runner.fed, state.samples, wall,
                         runner=runner.name, extra=runner.summary_extra())
