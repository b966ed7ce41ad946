"""The in-process runner: every stage in this process, events in the W-window oracle's order.

It is the reference the distributed runner (zdni/driver.py) is tested against: both are driven
by the same loop (zdni/loop.py), so they differ only in how a batch reaches the stages, and with
the same window (the method's, zdni/oracle.py) a distributed run forced into the oracle's order
equals it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from zdni import checkpoint, methods, rundir
from zdni.config import RunConfig
from zdni.loop import Data, State, load_data, score, train
from zdni.metrics import MetricsWriter
from zdni.models import build_stages, cut_points, input_shape, stage_count, stage_shapes
from zdni.oracle import Oracle
from zdni.plan import plan
from zdni.resume import Checkpoint, Checkpointer
from zdni.stage import Outcome, Stage


def build_pipeline(cfg: RunConfig, device: str = "cpu",
                   units: list[nn.Module] | None = None) -> list[Stage]:
    """Every stage of the run with its synthesizers, as each worker would build its own (or
    from the units of a live model)."""
    modules = build_stages(cfg, units)
    shapes = stage_shapes(modules, input_shape(cfg))
    return [methods.build(cfg, i + 1, m, shapes, device=device) for i, m in enumerate(modules)]


@torch.no_grad()
def evaluate(stages: list[Stage], x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    """Test loss (mean) and accuracy of the composed stages."""
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch):
        h = x[start : start + batch]
        for stage in stages:
            h = stage.evaluate(h)
        batch_loss, batch_correct = score(h, y[start : start + batch])
        loss_sum += batch_loss
        correct += batch_correct
    return loss_sum / len(x), correct / len(x)


class InprocRunner:
    """The loop's runner with every stage here: a fed batch is finished when feed returns."""

    name = "inproc"

    def __init__(self, cfg: RunConfig, metrics: MetricsWriter, device: str = "cpu",
                 units: list[nn.Module] | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.pipeline = build_pipeline(cfg, device, units)
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

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[float, float]:
        return evaluate(self.pipeline, x, y, self.cfg.eval_batch_size)

    def flight(self) -> tuple[int | None, dict[int, int] | None]:
        return None, None  # the oracle's in-flight count is its schedule's, not a measurement

    def progress(self) -> dict[str, Any]:
        return {}

    def epoch_end(self, epoch: int, accuracy: float) -> None:
        """No run state outside this process to record."""

    def summary_extra(self) -> dict[str, Any]:
        return {"max_inflight": self.window}

    def start_at(self, fed: int) -> None:
        self.oracle.start_at(fed)

    def snapshot(self) -> dict[int, State]:
        return {s.index: checkpoint.stage_state(s, self.fed - 1) for s in self.pipeline}


def train_inproc(cfg: RunConfig, quiet: bool = False, download: bool = False,
                 out_dir: str | None = None, data: Data | None = None,
                 units: list[nn.Module] | None = None, tensorboard: str | None = None,
                 live: nn.Module | None = None, resume: Checkpoint | None = None
                 ) -> dict[str, Any]:
    """Train with every stage in this process; returns the summary (metrics, checkpoints and
    model.pt go to out_dir). `data` and `units` are live objects (the Python API, `live` the
    network they are the children of); otherwise cfg names them. With `resume`, go on from
    that checkpoint (zdni.resume.prepare)."""
    cfg.validate()
    data = data if data is not None else load_data(cfg, download)
    chosen = plan(cfg, data, units, resumed=resume is not None)
    count = stage_count(cfg) if units is None else len(cut_points(len(units), cfg.stages,
                                                                   cfg.cuts))
    with rundir.closing(out_dir, cfg, data.norm, live, resumed=resume is not None):
        metrics = MetricsWriter(cfg, count, out_dir, runner="inproc", tensorboard=tensorboard,
                                append=resume is not None)
        try:
            runner = InprocRunner(cfg, metrics, units=units)
            if resume is not None:
                for stage in runner.pipeline:
                    checkpoint.restore_stage(stage, *resume.states[stage.index])
            saver = Checkpointer(out_dir, cfg, resume) if out_dir else None
            summary = train(cfg, runner, data, metrics, quiet,
                            start=resume.loop if resume else None, saver=saver)
            if saver is not None:
                summary["checkpoints"] = saver.tally()
        finally:
            metrics.close()
    if chosen:
        summary["balance"] = chosen
    return summary
