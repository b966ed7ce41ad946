"""Metric records of a run: JSON lines in OUT/metrics.jsonl and a capped Redis stream.

Record kinds (every record also has ``kind`` and ``t``, unix seconds):

    start  run_id, runner, stages, config: the run's settings (labels the run in reports)
    resume run_id, runner, stages, iteration, epoch: a resumed run goes on from its checkpoint
           at `iteration`; the records after the checkpoint that came before this one were
           abandoned (read_metrics leaves them out)
    iter   iteration (batches fed so far), epoch, wall_s, samples, samples_per_s (since the last
           iter record), train_loss, train_accuracy (of the batches the last stage trained on,
           before their update), inflight (batches fed but not finished by every stage), and
           per stage (keys "1".."S"): lag (batches fed but not yet finished by that stage: its
           queue depth), staleness (iterations a stage had updated past `it` when the true
           gradient of `it` arrived), grad_loss (M's L2 loss), input_loss (I's L2 loss),
           grad_cos and grad_err (M's answer against the true gradient, scale-free: their
           cosine, and the error's norm over the true gradient's), trust (the trust gate's
           scale of the stage's learning rate, 0..1: zdni/trust.py), and any other number a
           method reports per stage (dgl's aux_loss, pipedream's stash_mb: zdni/methods/)
    eval   iteration, epoch, wall_s, and the scores of the set "best" is chosen on:
           val_loss, val_METRIC with a validation set, else test_loss, test_METRIC (METRIC is
           accuracy by default: zdni/objective.py), every --eval-every iterations
    test   iteration, test_loss, test_METRIC: the test set scored once, at the end, when a
           validation set was scored every epoch
    epoch  the summary's history row (train loss/accuracy, the scores as eval's, per-stage
           grad_loss/input_loss) plus
           samples and samples_per_s since the start
    stage  one per stage at each epoch's end: lag_mean/lag_max, staleness_mean/staleness_max,
           and the mean of every other per-stage number over the epoch

Stages report their numbers in their DONE messages; the driver (or the in-process trainer) is the
only writer, so one file and one stream hold the whole run in order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from typing import Any

import redis
import torch

from zdni import keys
from zdni.config import RunConfig
from zdni.held import base_name
from zdni.outage import RedisWatch

log = logging.getLogger("zdni.metrics")

EVERY = 10  # iterations per iter record: ~47 per MNIST epoch, enough for smooth curves
CLOSE_UP = 200  # every iteration is recorded up to here: the report's close-up of the start
STREAM_MAXLEN = 10_000  # Redis keeps about this many records per run (approximate trimming)
STAGE_FIELDS = ("lag", "staleness", "grad_loss", "input_loss", "grad_cos", "grad_err", "trust")
TRAIN = {"loss": "train_loss", "accuracy": "train_accuracy"}  # the last stage's numbers


class MetricsWriter:
    """Aggregates what the stages report and appends records to the file and the stream."""

    def __init__(self, cfg: RunConfig, stages: int, out_dir: str | None = None,
                 client: redis.Redis | None = None, runner: str = "zdni",
                 every: int = EVERY, tensorboard: str | None = None,
                 append: bool = False) -> None:
        self.stages = stages
        self.board = None
        if tensorboard:  # the same records as TensorBoard scalars (zdni/board.py)
            from zdni.board import Board

            self.board = Board(tensorboard)
        self.every = every
        self.client = client
        self.watch = RedisWatch("[driver] metrics:", float("inf"))
        self.stream = keys.metrics(cfg.run_id)
        self.file = None
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            self.path = os.path.join(out_dir, "metrics.jsonl")
            # Line-buffered: survives a kill. A resumed run appends (its history goes on).
            self.file = open(self.path, "a" if append else "w", buffering=1)
        self.window: dict[str, list[float]] = defaultdict(list)  # since the last iter record
        self.epoch_acc: dict[str, list[float]] = defaultdict(list)  # since the last epoch record
        self.last_samples = 0
        self.last_wall = 0.0
        self.last_loss: float | None = None  # the newest training loss, for the progress bar
        self.head = {"run_id": cfg.run_id, "runner": runner, "stages": stages}
        if not append:  # a resumed run says so in restore(), where it knows its iteration
            self.record("start", **self.head, config=json.loads(cfg.to_json()))

    # -- resuming -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the epoch's numbers so far (its means continue)."""
        return {"epoch_acc": {k: list(v) for k, v in self.epoch_acc.items()},
                "last_loss": self.last_loss}

    def restore(self, state: dict[str, Any], iteration: int, epoch: int) -> None:
        """Go on from a checkpoint's state() at `iteration`; records a 'resume'."""
        self.epoch_acc = defaultdict(list, {k: [float(x) for x in v] for k, v in
                                            state.get("epoch_acc", {}).items()})
        self.last_loss = state.get("last_loss")
        self.record("resume", **self.head, iteration=iteration, epoch=epoch)

    # -- what the stages report -----------------------------------------------------------
    def observe(self, stage: int, metrics: dict[str, Any]) -> None:
        """Take one stage event's numbers (a DONE message's meta or an Outcome's metrics)."""
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                    value):
                continue
            name = base_name(name)  # NAME/k: the k-th synthesizer event a stage held (zdni.held)
            key = TRAIN.get(name, f"{name}:{stage}")
            self.window[key].append(float(value))
            self.epoch_acc[key].append(float(value))
            if name == "loss":
                self.last_loss = float(value)

    # -- records --------------------------------------------------------------------------
    def iteration(self, iteration: int, epoch: int, samples: int, wall_s: float,
                  inflight: int | None = None, lag: dict[int, int] | None = None) -> None:
        """After `iteration` batches: an iter record every `every` (every one up to CLOSE_UP)."""
        for s, value in (lag or {}).items():
            self.epoch_acc[f"lag:{s}"].append(float(value))
        if iteration > CLOSE_UP and iteration % self.every:
            return
        span = wall_s - self.last_wall
        fields: dict[str, Any] = {
            "iteration": iteration, "epoch": epoch, "wall_s": round(wall_s, 3), "samples": samples,
            "samples_per_s": round((samples - self.last_samples) / span, 1) if span > 0 else None,
            "train_loss": _mean(self.window.get("train_loss", [])),
            "train_accuracy": _mean(self.window.get("train_accuracy", [])),
        }
        if inflight is not None:
            fields["inflight"] = inflight
        if lag is not None:
            fields["lag"] = {str(s): v for s, v in sorted(lag.items())}
        for name in _stage_names(self.window, STAGE_FIELDS[1:]):
            fields[name] = self._window_means(name)
        self.record("iter", **fields)
        self.window.clear()
        self.last_samples, self.last_wall = samples, wall_s

    def eval(self, iteration: int, epoch: int, wall_s: float, scores: dict[str, float]) -> None:
        """An evaluation within an epoch: scores are {SPLIT_loss, SPLIT_METRIC}."""
        self.record("eval", iteration=iteration, epoch=epoch, wall_s=round(wall_s, 3), **scores)

    def epoch(self, epoch: int, scores: dict[str, float], wall_s: float,
              iterations: int, samples: int) -> dict[str, Any]:
        """Close an epoch: its history row (returned, and recorded), then one stage record per
        stage; the training numbers are the means of what the stages reported in the epoch,
        `scores` the epoch's evaluations ({val,test}_loss and {val,test}_METRIC)."""
        per_stage = {name: {str(s): _mean(self.epoch_acc[f"{name}:{s}"])
                            for s in range(1, self.stages + 1) if self.epoch_acc.get(f"{name}:{s}")}
                     for name in ("grad_loss", "input_loss")}
        row: dict[str, Any] = {
            "epoch": epoch, "iterations": iterations,
            "train_loss": _mean(self.epoch_acc.get("train_loss", [])),
            "train_accuracy": _mean(self.epoch_acc.get("train_accuracy", [])),
            **scores, "wall_s": round(wall_s, 3), **per_stage}
        wall = round(wall_s, 3)
        self.record("epoch", **row, samples=samples,
                    samples_per_s=round(samples / wall, 1) if wall > 0 else None)
        for s in range(1, self.stages + 1):
            fields: dict[str, Any] = {"stage": s, "epoch": row["epoch"],
                                      "iteration": row["iterations"]}
            for name in _stage_names(self.epoch_acc, STAGE_FIELDS):
                values = self.epoch_acc.get(f"{name}:{s}", [])
                if name in ("lag", "staleness"):
                    fields[f"{name}_mean"] = _mean(values)
                    fields[f"{name}_max"] = max(values) if values else None
                else:
                    fields[name] = _mean(values)
            self.record("stage", **fields)
        self.epoch_acc.clear()
        return row

    def record(self, kind: str, **fields: Any) -> None:
        """Append one record to the file and the stream; a Redis error only disables the stream."""
        rec = {"kind": kind, "t": round(time.time(), 3), **fields}
        line = json.dumps(rec)
        if self.board is not None:
            self.board.write(rec)
        if self.file is not None:
            self.file.write(line + "\n")
        if self.client is not None:  # skipped while Redis is away; the file has every record
            try:
                self.watch.call(self.client.xadd, self.stream, {"kind": kind, "json": line},
                                maxlen=STREAM_MAXLEN, approximate=True)
            except redis.RedisError as exc:  # not a lost connection: the stream is refused
                log.warning("[driver] metrics stream disabled: %s", exc)
                self.client = None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.board is not None:
            self.board.close()
            self.board = None

    def _window_means(self, name: str) -> dict[str, float]:
        """Per stage ("1".."S") the mean of `name` since the last iter record, where reported."""
        values = {s: self.window.get(f"{name}:{s}") for s in range(1, self.stages + 1)}
        return {str(s): sum(v) / len(v) for s, v in values.items() if v}


def _stage_names(store: dict[str, list[float]], always: tuple[str, ...]) -> list[str]:
    """The per-stage fields to record: `always`, then any other a stage reported (keys
    'name:stage'), by name."""
    seen = {key.rpartition(":")[0] for key in store if ":" in key}
    return [*always, *sorted(seen - set(always) - {"lag"})]


def train_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of a training batch the logits (B, C, ...) predict right; with labels
    shaped per sample (B, ...), a sample is right when every one of its positions is."""
    right = (logits.detach().argmax(1) == y).reshape(len(y), -1).all(dim=1)
    return float(right.float().mean().item())


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a torn last line, from a killed run, is skipped),
    without those a resumed run abandoned: the ones past its checkpoint before it resumed."""
    records: list[dict[str, Any]] = []
    with open(path) as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("kind") == "resume":
                since = record.get("iteration", 0)
                records = [r for r in records if _iteration(r) is None or _iteration(r) <= since]
            records.append(record)
    return records


def _iteration(record: dict[str, Any]) -> int | None:
    """The iteration count a training record was made at (None: not a training record)."""
    if record.get("kind") not in ("iter", "eval", "epoch", "stage"):
        return None
    value = record.get("iterations", record.get("iteration"))
    return value if isinstance(value, int) else None
