"""Runs on disk: one run's metrics records (Run), runs of one setting over seeds (Variant),
and finding and reading them under directories."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from zdni.errors import ZdniError
from zdni.metrics import read_metrics

log = logging.getLogger("zdni.report")

NOT_VARIANT = ("seed", "run_id", "data_dir")  # settings that do not make a different variant


class ReportError(ZdniError, ValueError):
    """A run directory cannot be read; the message names it."""


class UnfinishedRun(ReportError):
    """A run directory without a finished epoch: skipped by a report, with a warning."""


@dataclass
class Run:
    """One run's records, split by kind."""

    path: str
    start: dict[str, Any]
    records: list[dict[str, Any]]
    label: str = ""

    def kind(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == name]

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.start.get("config", {}))

    @property
    def key(self) -> tuple[Any, ...]:
        cfg = {k: v for k, v in self.config.items() if k not in NOT_VARIANT}
        return (self.start.get("runner"), *sorted((k, repr(v)) for k, v in cfg.items()))

    def accuracy(self) -> list[tuple[int, float, float]]:
        """(iteration, wall_s, accuracy) of every eval and epoch record, in order: on the
        validation set where the run had one, else on the test set (none for another metric)."""
        points = [(int(r.get("iterations", r.get("iteration", 0))), float(r["wall_s"]),
                   float(r["val_accuracy"] if "val_accuracy" in r else r["test_accuracy"]))
                  for r in self.records if r["kind"] in ("eval", "epoch")
                  and ("val_accuracy" in r or "test_accuracy" in r)]
        return sorted(points)


@dataclass
class Variant:
    """Runs of the same settings but different seeds."""

    label: str
    runs: list[Run] = field(default_factory=list)

    @property
    def name(self) -> str:
        seeds = ",".join(str(r.config.get("seed")) for r in self.runs)
        return f"{self.label} (seeds {seeds})" if len(self.runs) > 1 else self.label


def find_runs(paths: list[str]) -> list[Run]:
    """Each path is a run directory, or a directory whose subdirectories are runs. A run with
    no finished epoch (interrupted, or still running) is skipped with a warning."""
    runs = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "metrics.jsonl")):
            candidates = [path]
        else:
            children = sorted(os.path.join(path, d) for d in os.listdir(path)) if os.path.isdir(
                path) else []
            candidates = [c for c in children if os.path.isfile(os.path.join(c, "metrics.jsonl"))]
            if not candidates:
                raise ReportError(f"{path}: no metrics.jsonl here or in its subdirectories")
        for candidate in candidates:
            try:
                runs.append(load_run(candidate))
            except UnfinishedRun as exc:
                log.warning("skipped %s", exc)
    if not runs:
        raise ReportError(f"no finished run in {', '.join(paths)}")
    return runs


def load_run(path: str) -> Run:
    records = read_metrics(os.path.join(path, "metrics.jsonl"))
    starts = [r for r in records if r.get("kind") == "start"]
    if not starts:
        raise ReportError(f"{path}/metrics.jsonl has no 'start' record")
    if not any(r["kind"] in ("epoch", "done") for r in records):  # done: zdni sequence
        raise UnfinishedRun(f"{path}: no finished epoch (interrupted, or still running)")
    return Run(path, starts[0], records)
