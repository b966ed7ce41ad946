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
from typing import Any, Protocol

import torch

from zdni.config import DATASETS, RunConfig, parse_copy_data
from zdni.data import DataError, load_dataset, reader_normalization
from zdni.errors import ZdniError
from zdni.metrics import MetricsWriter
from zdni.objective import Objective, objective_of
from zdni.progress import Progress
from zdni.sequence import copy_chunks
from zdni.split import Data, Split, TensorSplit, hold_out
from zdni.summary import build_summary

__all__ = ["Data", "LoopState", "RunError", "Runner", "Saver", "State", "load_data", "train",
           "with_validation"]

State = tuple[dict[str, torch.Tensor], dict[str, Any]]  # one stage's tensors and metadata


class RunError(ZdniError, RuntimeError):
    """The run cannot go on: a stage died, stalled or never started. The message says which."""


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

    def before_evaluation(self) -> None:
        """Return once an evaluation sent now sees the parameters after the last iteration
        fed, at every stage: a drain, or nothing where the evaluation queues behind it."""
        ...

    def evaluate(self, split: Split, epoch: int) -> tuple[float, float]:
        """(mean loss, mean metric) of the current parameters on a split, batch by batch."""
        ...

    def flight(self) -> tuple[int | None, dict[int, int] | None]:
        """Iterations in flight and each stage's lag, for the metrics (None where none)."""
        ...

    def progress(self) -> dict[str, Any]:
        """Extra fields of the progress bar."""
        ...

    def epoch_end(self, epoch: int, scores: dict[str, float], best: bool) -> None:
        """An epoch was evaluated (scores: val_/test_ loss and metric); `best`: its selection
        score is the best so far (the distributed runner records them in Redis)."""
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
    state: a feeder's batch is a pure function of (seed, epoch, position)."""

    epoch: int = 0  # the epoch in progress, 0-based (== epochs done when position is 0)
    position: int = 0  # the next batch of that epoch
    fed: int = 0  # iterations fed so far: the next iteration's number
    samples: int = 0  # training samples fed so far
    wall_s: float = 0.0  # training time so far, seconds
    accuracy: float | None = None  # the newest test accuracy (None where not scored)
    # [epoch, score] of the best epoch so far, on the set "best" is chosen on (loop.train)
    best: list[float] | None = None
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


def load_data(cfg: RunConfig, download: bool = False) -> Data:
    """The run's training, validation and test sets (cached per process: a second call is
    free): a zoo dataset from cfg.data_dir, or a user's file or factory (zdni/userdata.py);
    the validation set held out of the training set (cfg.val_split) or read (cfg.val_data)."""
    copy = parse_copy_data(cfg.dataset)
    val: Split | None = None
    if copy:  # generated: sequence batches of chunks, in order (zdni.sequence.copy_chunks)
        length, T = copy
        chunks = -(-(2 * length + 1) // T)
        per_batch = chunks * cfg.batch_size
        train = max(1, (cfg.train_limit or 100 * per_batch) // per_batch)
        test = max(1, (cfg.test_limit or 10 * per_batch) // per_batch)
        x_train, y_train = copy_chunks(train, cfg.batch_size, length, T, seed=cfg.seed)
        x_test, y_test = copy_chunks(test, cfg.batch_size, length, T, seed=cfg.seed + 10_007)
        return Data.of(x_train, y_train, x_test, y_test, ordered=True)
    if cfg.dataset in DATASETS:
        train_split: Split = TensorSplit(*load_dataset(cfg.dataset, cfg.data_dir, True, download,
                                                       cfg.train_limit))
        test_split: Split = TensorSplit(*load_dataset(cfg.dataset, cfg.data_dir, False, download,
                                                      cfg.test_limit))
        norm = reader_normalization(cfg.dataset)
    else:
        from zdni.userdata import load_user_splits, read_val

        train_split, val, test_split, norm = load_user_splits(cfg.dataset, cfg.dataset_args)
        if cfg.val_data:
            if val is not None:
                raise DataError(f"{cfg.dataset} gives a validation set already: no --val-data")
            train_split, val, test_split, norm = read_val(cfg.dataset, cfg.val_data,
                                                          cfg.dataset_args)
        train_split, test_split = train_split.limit(cfg.train_limit), test_split.limit(
            cfg.test_limit)
    data = with_validation(cfg, train_split, val, test_split)
    data.norm = norm
    return data


def with_validation(cfg: RunConfig, train: Split, val: Split | None, test: Split) -> Data:
    """The run's data, with cfg.val_split of the training set held out for validation."""
    if cfg.val_split:
        if val is not None:
            raise DataError(f"{cfg.dataset} gives a validation set already: no --val-split")
        train, val = hold_out(train, cfg.val_split, cfg.seed)
    return Data(train, test, val)


def better(value: float, best: float | None, higher: bool) -> bool:
    """Whether `value` beats `best` (None: nothing yet) in the metric's direction."""
    return best is None or (value > best if higher else value < best)


def train(cfg: RunConfig, runner: Runner, data: Data, metrics: MetricsWriter,
          quiet: bool = False, start: LoopState | None = None, saver: Saver | None = None,
          objective: Objective | None = None) -> dict[str, Any]:
    """Train cfg.epochs epochs (at most cfg.max_iterations iterations) through `runner`;
    returns the summary. From `start` (a resumed run: the runner's stages already hold its
    checkpoint), else from the beginning; `saver` checkpoints when it is due and at every
    epoch's end.

    Every epoch is scored on the validation set when there is one (and on the test set too
    with cfg.test_every_epoch), else on the test set; "best" is the epoch whose score on that
    set was best, in the metric's direction. With a validation set, the test set is scored
    once, at the end.
    """
    objective = objective or objective_of(cfg)
    m = objective.metric
    feeder = data.train.feeder(cfg.batch_size, cfg.seed, not data.ordered, cfg.data_workers,
                               cfg.drop_last)
    per_epoch = feeder.batches_per_epoch  # None: a stream, whose pass ends where it does
    on, watched = ("val", data.val) if data.val is not None else ("test", data.test)
    state = start or LoopState()
    if start is not None:
        runner.start_at(start.fed)
        metrics.restore(start.metrics, start.fed, start.epoch + 1)
    total = per_epoch * cfg.epochs if per_epoch else cfg.max_iterations or 0
    progress = Progress(min(total, cfg.max_iterations or total), runner.label, quiet=quiet)
    began = time.monotonic() - state.wall_s  # a resumed run's wall time goes on counting
    shown: float | None = None  # the newest score, for the progress line

    def evaluate(split: Split, name: str, epoch: int) -> dict[str, float]:
        loss, value = runner.evaluate(split, epoch)
        return {f"{name}_loss": loss, f"{name}_{m}": value}

    def step(x: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
        nonlocal shown
        it = runner.feed(x, y)
        state.samples += len(x)
        metrics.iteration(it, epoch + 1, state.samples, time.monotonic() - began,
                          *runner.flight())
        if cfg.eval_every and it % cfg.eval_every == 0 and (per_epoch is None or
                                                            it % per_epoch):
            runner.before_evaluation()  # the parameters of one iteration, not a mix
            scores = evaluate(watched, on, epoch)
            metrics.eval(it, epoch + 1, time.monotonic() - began, scores)
            shown = scores[f"{on}_{m}"]
        progress.update(it, epoch=epoch + 1, loss=metrics.last_loss, **{f"{on}_{m}": shown},
                        sps=round(state.samples / max(time.monotonic() - began, 1e-9)),
                        **runner.progress())

    def checkpoint(epoch: int, position: int) -> None:
        assert saver is not None
        state.epoch, state.position = epoch, position
        state.wall_s = time.monotonic() - began
        saver.save(runner, state, metrics)

    first_epoch, first_batch = state.epoch, state.position
    # batches of the data set fed (no replays); a stream is not resumed (zdni/plan.py)
    done = first_epoch * (per_epoch or 0) + first_batch
    for epoch in range(first_epoch, cfg.epochs):
        for index, xb, yb in feeder.iter_epoch(epoch, first_batch if epoch == first_epoch
                                               else 0):
            for rx, ry in runner.replays():
                step(rx, ry, epoch)
            step(xb, yb, epoch)
            done += 1
            if done == cfg.max_iterations:
                break
            if saver is not None and (per_epoch is None or index + 1 < per_epoch) and \
                    saver.due(runner.fed):
                checkpoint(epoch, index + 1)
        runner.settle()
        scores = evaluate(watched, on, epoch)
        if data.val is not None and cfg.test_every_epoch:
            scores |= evaluate(data.test, "test", epoch)
        shown = scores[f"{on}_{m}"]
        state.accuracy = scores.get("test_accuracy")
        state.history.append(metrics.epoch(epoch + 1, scores, time.monotonic() - began,
                                           runner.fed, state.samples))
        improved = better(shown, state.best[1] if state.best else None,
                          objective.higher_is_better)
        if improved:
            state.best = [epoch + 1, shown]
        runner.epoch_end(epoch + 1, scores, improved)
        if saver is not None:
            checkpoint(epoch + 1, 0)
        if done == cfg.max_iterations:  # the last, partial epoch was evaluated
            break
    progress.close()
    final = {k: v for k, v in state.history[-1].items() if k.startswith("test_")}
    if data.val is not None and not cfg.test_every_epoch:  # the test set, once, at the end
        final = evaluate(data.test, "test", len(state.history))
        metrics.record("test", iteration=runner.fed, **final)
    wall = time.monotonic() - began
    assert state.best is not None
    scored = {"metric": m, "metric_goal": objective.goal, "best_on": on,
              "best_epoch": int(state.best[0]), f"best_{on}_{m}": state.best[1], **final}
    if data.val is not None:
        scored |= {f"val_{m}": state.history[-1][f"val_{m}"],
                   "val_loss": state.history[-1]["val_loss"]}
    return build_summary(cfg, runner.stages, state.history, runner.fed, state.samples, wall,
                         runner=runner.name, scores=scored, extra=runner.summary_extra())
