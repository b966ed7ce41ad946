"""The in-process reference trainer: all stages in one process, events in the one-in-flight order."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from zdni.config import RunConfig
from zdni.data import BatchFeeder, load_dataset
from zdni.metrics import MetricsWriter
from zdni.models import INPUT_SHAPES, build_stages, stage_shapes
from zdni.progress import Progress
from zdni.schedule import iteration_events
from zdni.stage import Outcome, Stage
from zdni.summary import EpochStats, build_summary


def build_pipeline(cfg: RunConfig, device: str = "cpu") -> list[Stage]:
    """Every stage of the run with its synthesizers, as each worker would build its own."""
    modules = build_stages(cfg)
    shapes = stage_shapes(modules, INPUT_SHAPES[cfg.dataset])
    return [Stage(cfg, i + 1, m, shapes, device=device) for i, m in enumerate(modules)]


def run_iteration(
    stages: list[Stage], it: int, x: torch.Tensor, y: torch.Tensor, mode: str
) -> dict[int, Outcome]:
    """Apply one iteration's events in schedule order; returns each stage's 'done' outcome."""
    acts: dict[int, torch.Tensor] = {0: x}
    grads: dict[int, torch.Tensor] = {}
    done: dict[int, Outcome] = {}
    for kind, i in iteration_events(mode, len(stages)):
        stage = stages[i - 1]
        if kind == "batch":
            out = stage.train_batch(it, x, y if stage.needs_y else None)
        elif kind == "input":
            out = stage.train_input(it, acts[i - 1], y if stage.needs_y else None)
        else:
            out = stage.train_grad(it, grads.pop(i))
        if out.h_out is not None:
            acts[i] = out.h_out
        if out.d_in is not None and i > 1:
            grads[i - 1] = out.d_in
        if out.done:
            done[i] = out
        elif out.metrics:
            done.setdefault(-i, out)  # metrics of non-final events (M training) are kept too
    return done


@torch.no_grad()
def evaluate(stages: list[Stage], x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    """Test loss (mean) and accuracy of the composed stages."""
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch):
        h = x[start : start + batch]
        for stage in stages:
            h = stage.evaluate(h)
        target = y[start : start + batch].to(h.device)
        loss_sum += F.cross_entropy(h, target, reduction="sum").item()
        correct += int((h.argmax(1) == target).sum())
    return loss_sum / len(x), correct / len(x)


def train_inproc(cfg: RunConfig, quiet: bool = False, download: bool = False,
                 out_dir: str | None = None) -> dict[str, Any]:
    """Train with every stage in this process; returns the summary (metrics go to out_dir)."""
    cfg.validate()
    x_train, y_train = load_dataset(cfg.dataset, cfg.data_dir, True, download, cfg.train_limit)
    x_test, y_test = load_dataset(cfg.dataset, cfg.data_dir, False, download, cfg.test_limit)
    stages = build_pipeline(cfg)
    feeder = BatchFeeder(x_train, y_train, cfg.batch_size, cfg.seed)
    total = feeder.batches_per_epoch * cfg.epochs
    progress = Progress(total, f"inproc {cfg.mode}", quiet=quiet)
    metrics = MetricsWriter(cfg, len(stages), out_dir, runner="inproc")
    history: list[dict[str, Any]] = []
    start = time.monotonic()
    it = samples = 0
    accuracy = None
    for epoch in range(cfg.epochs):
        stats = EpochStats()
        for _, xb, yb in feeder.iter_epoch(epoch):
            for i, outcome in run_iteration(stages, it, xb, yb, cfg.mode).items():
                stats.add(abs(i), outcome.metrics)
                metrics.observe(abs(i), outcome.metrics)
            it += 1
            samples += len(xb)
            metrics.iteration(it, epoch + 1, samples, time.monotonic() - start)
            if cfg.eval_every and it % cfg.eval_every == 0 and it % feeder.batches_per_epoch:
                result = evaluate(stages, x_test, y_test, cfg.eval_batch_size)
                _, accuracy = metrics.eval(it, epoch + 1, time.monotonic() - start, *result)
            progress.update(it, epoch=epoch + 1, loss=stats.losses[-1] if stats.losses else None,
                            acc=accuracy, sps=round(samples / (time.monotonic() - start)))
        test_loss, accuracy = evaluate(stages, x_test, y_test, cfg.eval_batch_size)
        history.append(stats.row(epoch + 1, test_loss, accuracy, time.monotonic() - start, it))
        metrics.epoch(history[-1], samples)
    progress.close()
    metrics.close()
    wall = time.monotonic() - start
    return build_summary(cfg, len(stages), history, it, samples, wall, runner="inproc")
