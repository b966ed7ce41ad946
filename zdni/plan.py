"""Resolving a run before any process starts: its input shape and classes from the data, the
model built and probed once, the cuts checked or balanced by measurement.

The driver plans a run, then publishes the config; a worker, which never reads the data,
builds the same shapes and the same cut from what the plan wrote into the config. Every
problem here is a one-line ConfigError, DataError or UserCodeError, before anything starts.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
from torch import nn

from zdni import balance, limits, methods
from zdni.config import ConfigError, RunConfig
from zdni.data import DataError
from zdni.models import build_units, cut_points
from zdni.objective import CROSS_ENTROPY, Objective, objective_of
from zdni.optimspec import stage_spec, synth_spec
from zdni.probe import probe, unit_shapes
from zdni.split import Data, IterSplit, TensorSplit, size
from zdni.transport import HWM
from zdni.usercode import UserCodeError
from zdni.userdata import classes_of

log = logging.getLogger("zdni.driver")

__all__ = ["plan"]

PROBE = 8  # training samples the loss and metric are tried on before the run starts


def plan(cfg: RunConfig, data: Data, units: list[nn.Module] | None = None,
         device: str = "cpu", threads: int | None = None, wire: bool = True,
         resumed: bool = False, objective: Objective | None = None) -> dict[str, Any]:
    """Fill in cfg.input_shape, the targets' kind and shape, cfg.classes, the batches per
    epoch and (with cfg.balance) cfg.cuts; check that the model's output fits the targets (the
    loss and metric run on a few real samples), that the cut can be made, that its messages
    fit the wire (unless `wire` is False: every stage in one process) and that every stage
    trains once on a real batch. Returns what balancing chose and measured (empty without
    cfg.balance), for the summary. A `resumed` run keeps the cuts it was balanced to when it
    started: its checkpoint's weights are cut there."""
    method = methods.get(cfg.mode)
    method.settings(cfg)  # the method's own settings (--method-arg), checked before anything
    if cfg.conditioned and not method.synthetic:
        raise ConfigError(f"--conditioned needs a method with synthesizers (sg, full): "
                          f"{cfg.mode} has none; drop --conditioned or pick another --mode")
    safe = methods.SAFE_WINDOWS.get(cfg.mode)
    if safe is not None and cfg.max_inflight is not None and cfg.max_inflight > safe \
            and not resumed:
        log.warning("[driver] --max-inflight %d: %s's accuracy can fall with more than %d "
                    "batches in flight (an MLP with LayerNorm: 95.0%% at 1, 93.3%% at 2, 90.9%% "
                    "at 4 with the trust gate, 21%% without; docs/RESULTS.md)", cfg.max_inflight,
                    cfg.mode, safe)
    if isinstance(data.train, IterSplit):
        _streamable(cfg, resumed)
    x, y = data.train.probe(PROBE)
    cfg.input_shape = [int(d) for d in x.shape[1:]]
    cfg.epoch_batches = data.steps_per_epoch(cfg.batch_size, cfg.drop_last)
    cfg.label_shape = [int(d) for d in y.shape[1:]]  # [] for one target per sample
    cfg.target_dtype = "float32" if y.is_floating_point() else "int64"
    cfg.validate()  # float targets need a loss other than cross-entropy
    _same_kind(data, x, y)
    needed = _classes(data, y)
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        units = units if units is not None else build_units(cfg.model, cfg.model_args)
    finally:
        torch.random.set_rng_state(state)
    shapes = unit_shapes(cfg.model, units, tuple(cfg.input_shape),
                         (size(data.train) or cfg.batch_size, *cfg.input_shape))
    out = shapes[-1]
    want = (needed, *cfg.label_shape)
    if cfg.loss == CROSS_ENTROPY:
        if len(out) != len(want) or out[0] < needed or tuple(out[1:]) != want[1:]:
            raise ConfigError(f"model {cfg.model} outputs {out} per sample, but the data's "
                              f"labels need {needed} classes: the output must be {want} (or "
                              "more classes)")
        cfg.classes = out[0]  # a subset of the data may not show every class; the model knows
    else:
        streamed_indices = cfg.target_dtype == "int64" and not _in_memory(data) and out
        cfg.classes = max(needed, out[0]) if streamed_indices else needed
        _probe(cfg, units, x, y, objective or objective_of(cfg))
    record: dict[str, Any] = {}
    if cfg.balance is not None and not resumed:
        if cfg.cuts:
            raise ConfigError("give --cuts or --balance, not both")
        if not 1 <= cfg.stages <= len(units):
            raise ConfigError(f"stages must be within 1..{len(units)} for this model, got "
                              f"{cfg.stages}")
        if cfg.balance == "time":
            # Measure with the threads a worker will have: cores / stages, as zdni train and
            # a worker without --threads give it (a unit's cost depends on them).
            before = torch.get_num_threads()
            torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // cfg.stages))
            try:
                costs = balance.profile(cfg, units, tuple(cfg.input_shape), device)
            finally:
                torch.set_num_threads(before)
        else:
            costs = balance.param_costs(units)
        cfg.cuts = balance.split(costs, cfg.stages) or None
        per_stage = balance.stage_costs(costs, cfg.cuts or [])
        scale = 1e3 if cfg.balance == "time" else 1.0
        even = balance.stage_costs(costs, cut_points(len(units), cfg.stages)[1:])
        record = {"method": cfg.balance, "cuts": cfg.cuts or [],
                  "unit_costs": [round(c * scale, 4) for c in costs.units],
                  "stage_costs": [round(c * scale, 4) for c in per_stage],
                  "even_stage_costs": [round(c * scale, 4) for c in even],
                  "unit": "ms" if cfg.balance == "time" else "parameters"}
    points = cut_points(len(units), cfg.stages, cfg.cuts)
    if cfg.freeze_stage is not None and not 1 <= cfg.freeze_stage <= len(points):
        raise ConfigError(f"freeze_stage {cfg.freeze_stage} is not a stage of this run")
    # what the wire and the broker allow, at the shapes where this cut falls (zdni/limits.py)
    if wire:
        limits.check(cfg, [shapes[p] for p in points] + [out], HWM)
    # every stage trains once, here, on the run's first batch and at the epoch's last size
    xb, yb = data.train.probe(cfg.batch_size)
    probe(cfg, units, points, xb, yb, size(data.train), objective)  # a stream: its first
    # after the probe: it may leave the epoch's last batch out (cfg.drop_last)
    cfg.epoch_batches = data.steps_per_epoch(cfg.batch_size, cfg.drop_last)
    return record


def _streamable(cfg: RunConfig, resumed: bool) -> None:
    """A ConfigError for what a training set read as a stream (an IterableDataset: no length,
    no index) cannot do: go on from a checkpoint within it, tell workers where an ordered
    run's epochs end before they come, schedule by epoch without the epoch's length, or be
    read by DataLoader workers (zdni/stream.py)."""
    said = "the training set is a stream (an IterableDataset: no length, no index)"
    if resumed:
        raise ConfigError(f"{said}: a run over it cannot be resumed; start it again")
    if cfg.ordered:
        raise ConfigError(f"{said}: an ordered run (--ordered) must know where its epochs end; "
                          "drop --ordered or give a map-style Dataset")
    if cfg.data_workers:
        raise ConfigError(f"{said}: it is read in the driver, not by DataLoader workers; drop "
                          "--data-workers")
    for who, spec in (("the stages", stage_spec(cfg)), ("M and I", synth_spec(cfg))):
        if spec.lr_schedule == "cosine" and cfg.max_iterations is None:
            raise ConfigError(f"{said}: {who}' cosine schedule needs the run's length; give "
                              "--max-iterations")
        if spec.schedule_by == "epoch" and (spec.lr_schedule != "constant" or spec.warmup):
            raise ConfigError(f"{said}: {who}' schedule cannot count epochs of unknown "
                              "length; schedule by iteration (--schedule-by iteration, with "
                              "--max-iterations for a cosine)")


def _in_memory(data: Data) -> bool:
    return all(isinstance(p, TensorSplit) for p in (data.train, data.test, data.val) if p)


def _classes(data: Data, y: torch.Tensor) -> int:
    """Classes the targets need: every label's in memory, the first samples' when streamed
    (the model's output then says how many there are)."""
    if not _in_memory(data):
        return classes_of(y, y)
    parts = [p for p in (data.train, data.test, data.val) if isinstance(p, TensorSplit)]
    return max(classes_of(p.y, p.y) for p in parts)


def _same_kind(data: Data, x: torch.Tensor, y: torch.Tensor) -> None:
    """The validation and test sets' samples and targets have the training set's shapes and
    kind (their first samples, for a set read lazily)."""
    for name, part in (("validation", data.val), ("test", data.test)):
        if part is None:
            continue
        px, py = part.probe(2)
        if px.shape[1:] != x.shape[1:] or py.shape[1:] != y.shape[1:] or (
                py.is_floating_point() != y.is_floating_point()):
            raise DataError(f"the {name} set's samples are {tuple(px.shape[1:])} with targets "
                            f"{py.dtype} {tuple(py.shape[1:])}; the training set's "
                            f"{tuple(x.shape[1:])} with {y.dtype} {tuple(y.shape[1:])}")


def _probe(cfg: RunConfig, units: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
           objective: Objective) -> None:
    """The loss and metric on the model's output for a few training samples (eval mode, no
    gradient: the units are not changed), so that targets the loss does not accept are one
    line before anything starts."""
    model = nn.Sequential(*units)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng():
            out = model(x)
            try:
                loss = objective.loss(out, y)
                _, metric = objective.score(out, y)
            except UserCodeError:
                raise
            except Exception as exc:
                raise UserCodeError(
                    f"loss {cfg.loss} or metric {cfg.metric or 'loss'} on the model's output "
                    f"{tuple(out.shape)} and targets {y.dtype} {tuple(y.shape)} raised "
                    f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}") from None
    finally:
        model.train(was)
    if not torch.isfinite(loss) or not math.isfinite(metric):
        raise UserCodeError(f"loss {cfg.loss} gave {float(loss)} and the metric {metric} on the "
                            "model's output for the first training samples: expected finite")
