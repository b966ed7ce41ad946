"""The in-process runner: every stage in this process, events in the W-window oracle's order.

It is the reference the distributed runner (zdni/driver.py) is tested against: both are driven
by the same loop (zdni/loop.py), so they differ only in how a batch reaches the stages, and with
the same window (the method's, zdni/oracle.py) a distributed run forced into the oracle's order
equals it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from zdni import checkpoint, failure, methods, rundir
from zdni.config import RunConfig
from zdni.loop import State, load_data, train
from zdni.metrics import MetricsWriter
from zdni.models import build_stages, cut_points, input_shape, stage_count, stage_shapes
from zdni.objective import Objective, objective_of
from zdni.oracle import Oracle
from zdni.plan import plan
from zdni.resume import Checkpoint, Checkpointer
from zdni.rng import span
from zdni.split import Data, Split, TensorSplit
from zdni.stage import Outcome, Stage


def build_pipeline(cfg: RunConfig, device: str = "cpu", units: list[nn.Module] | None = None,
                   objective: Objective | None = None) -> list[Stage]:
    """Every stage of the run with its synthesizers, as each worker would build its own (or
    from the units of a live model; with a live loss and metric)."""
    modules = build_stages(cfg, units)
    shapes = stage_shapes(modules, input_shape(cfg))
    return [methods.build(cfg, i + 1, m, shapes, device=device, objective=objective)
            for i, m in enumerate(modules)]


@torch.no_grad()
def evaluate_batches(stages: list[Stage], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                     ) -> tuple[float, float]:
    """Mean loss and metric (accuracy by default) of the composed stages over the batches."""
    objective = stages[-1].objective or objective_of(stages[-1].cfg)
    loss_sum, metric_sum, n = 0.0, 0.0, 0
    for k, (x, y) in enumerate(batches):
        h = x
        for stage in stages:
            units = span(stage.module)  # the user's code raising, or non-finite values:
            with failure.guard(stage.index, units, k, "eval"):  # one line (zdni/failure.py)
                h = stage.evaluate(h)
            failure.check(stage.index, units, k, "eval", h, None, {})
        batch_loss, batch_metric = objective.score(h, y)
        loss_sum += batch_loss
        metric_sum += batch_metric
        n += len(x)
    return loss_sum / n, metric_sum / n


def evaluate(stages: list[Stage], x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    """Mean loss and metric of the composed stages on (x, y), in batches of `batch`."""
    return evaluate_batches(stages, TensorSplit(x, y).eval_batches(batch, 0, 0))


class InprocRunner:
    """The loop's runner with every stage here: a fed batch is finished when feed returns."""

    name = "inproc"

    def __init__(self, cfg: RunConfig, metrics: MetricsWriter, device: str = "cpu",
                 units: list[nn.Module] | None = None,
                 objective: Objective | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.pipeline = build_pipeline(cfg, device, units, objective)
        self.objective = self.pipeline[-1].objective
        self.stages = len(self.pipeline)
        self.window = methods.get(cfg.mode).largest_window(cfg)
        self.oracle = Oracle(self.pipeline, self.window)
        self.label = f"inproc {cfg.mode}"

    @property
    def fed(self) -> int:
        return self.oracle.fed

    def replays(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(())

    def feed(self, x: torch.Tensor, y: torch.Tensor) -> int:
        self._observe(self.oracle.feed(x, y))
        return self.fed

    def _observe(self, reports: list[tuple[int, Outcome]]) -> None:
        for stage, outcome in reports:
            self.metrics.observe(stage, outcome.metrics)

    def drain(self) -> None:
        """Finish every iteration in flight (the oracle's segment ends here)."""
        self._observe(self.oracle.drain())

    def settle(self) -> None:
        """Nothing is lost in process: settling is draining."""
        self.drain()

    def before_evaluation(self) -> None:
        """The oracle's segment ends at an evaluation: a drain."""
        self.drain()

    def evaluate(self, split: Split, epoch: int) -> tuple[float, float]:
        return evaluate_batches(self.pipeline, split.eval_batches(
            self.cfg.eval_batch_size, self.cfg.seed, self.cfg.data_workers))

    def flight(self) -> tuple[int | None, dict[int, int] | None]:
        return None, None  # the oracle's in-flight count is its schedule's, not a measurement

    def progress(self) -> dict[str, Any]:
        return {}

    def epoch_end(self, epoch: int, scores: dict[str, float], best: bool) -> None:
        """No run state outside this process to record."""

    def summary_extra(self) -> dict[str, Any]:
        return {"max_inflight": self.window}

    def start_at(self, fed: int) -> None:
        self.oracle.start_at(fed)

    def snapshot(self) -> dict[int, State]:
        """Drain, then every stage's state: a checkpoint is a cut with nothing in flight, so a
        run resumed from it goes on exactly as an uninterrupted one (which drained there too)."""
        self.drain()
        return {s.index: checkpoint.stage_state(s, self.fed - 1) for s in self.pipeline}


def train_inproc(cfg: RunConfig, quiet: bool = False, download: bool = False,
                 out_dir: str | None = None, data: Data | None = None,
                 units: list[nn.Module] | None = None, tensorboard: str | None = None,
                 live: nn.Module | None = None, resume: Checkpoint | None = None,
                 objective: Objective | None = None) -> dict[str, Any]:
    """Train with every stage in this process; returns the summary (metrics, checkpoints and
    model.pt go to out_dir). `data`, `units` and `objective` are live objects (the Python API,
    `live` the network the units are the children of); otherwise cfg names them. With
    `resume`, go on from that checkpoint (zdni.resume.prepare)."""
    cfg.validate()
    data = data if data is not None else load_data(cfg, download)
    chosen = plan(cfg, data, units, wire=False,  # nothing crosses a wire in process
                  resumed=resume is not None, objective=objective)
    count = stage_count(cfg) if units is None else len(cut_points(len(units), cfg.stages,
                                                                   cfg.cuts))
    with rundir.closing(out_dir, cfg, data.norm, live, resumed=resume is not None):
        metrics = MetricsWriter(cfg, count, out_dir, runner="inproc", tensorboard=tensorboard,
                                append=resume is not None)
        try:
            runner = InprocRunner(cfg, metrics, units=units, objective=objective)
            if resume is not None:
                for stage in runner.pipeline:
                    checkpoint.restore_stage(stage, *resume.states[stage.index])
            saver = Checkpointer(out_dir, cfg, resume) if out_dir else None
            summary = train(cfg, runner, data, metrics, quiet,
                            start=resume.loop if resume else None, saver=saver,
                            objective=runner.objective)
            if saver is not None:
                summary["checkpoints"] = saver.tally()
        finally:
            metrics.close()
    if chosen:
        summary["balance"] = chosen
    return summary
