"""Resolving a run before any process starts: its input shape and classes from the data, the
model built and probed once, the cuts checked or balanced by measurement.

The driver plans a run, then publishes the config; a worker, which never reads the data,
builds the same shapes and the same cut from what the plan wrote into the config. Every
problem here is a one-line ConfigError, DataError or UserCodeError, before anything starts.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from zdni import balance, methods
from zdni.config import ConfigError, RunConfig
from zdni.data import BatchFeeder
from zdni.loop import Data
from zdni.models import build_units, cut_points, stage_shapes
from zdni.usercode import UserCodeError
from zdni.userdata import classes_of

__all__ = ["plan"]


def plan(cfg: RunConfig, data: Data, units: list[nn.Module] | None = None,
         device: str = "cpu", threads: int | None = None, resumed: bool = False
         ) -> dict[str, Any]:
    """Fill in cfg.input_shape, cfg.classes and (with cfg.balance) cfg.cuts; check that the
    model's output fits the classes and that the cut can be made. Returns what balancing chose
    and measured (empty without cfg.balance), for the summary. A `resumed` run keeps the cuts
    it was balanced to when it started: its checkpoint's weights are cut there."""
    method = methods.get(cfg.mode)
    if cfg.conditioned and not method.synthetic:
        raise ConfigError(f"--conditioned needs a method with synthesizers (sg, full): "
                          f"{cfg.mode} has none; drop --conditioned or pick another --mode")
    cfg.input_shape = [int(d) for d in data.x_train.shape[1:]]
    cfg.epoch_batches = BatchFeeder(data.x_train, data.y_train, cfg.batch_size, cfg.seed,
                                    shuffle=not data.ordered).batches_per_epoch
    needed = classes_of(data.y_train, data.y_test)
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        units = units if units is not None else build_units(cfg.model, cfg.model_args)
    finally:
        torch.random.set_rng_state(state)
    try:
        out = stage_shapes([nn.Sequential(*units)], tuple(cfg.input_shape))[-1]
    except Exception as exc:
        raise UserCodeError(f"model {cfg.model}: a forward pass on inputs of shape "
                            f"{tuple(cfg.input_shape)} raised {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:160]}") from None
    cfg.label_shape = [int(d) for d in data.y_train.shape[1:]]  # [] for one class per sample
    want = (needed, *cfg.label_shape)
    if len(out) != len(want) or out[0] < needed or tuple(out[1:]) != want[1:]:
        raise ConfigError(f"model {cfg.model} outputs {out} per sample, but the data's labels "
                          f"need {needed} classes: the output must be {want} (or more classes)")
    cfg.classes = out[0]  # a subset of the data may not show every class; the model knows
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
    cut_points(len(units), cfg.stages, cfg.cuts)
    if cfg.freeze_stage is not None and not 1 <= cfg.freeze_stage <= len(
            cut_points(len(units), cfg.stages, cfg.cuts)):
        raise ConfigError(f"freeze_stage {cfg.freeze_stage} is not a stage of this run")
    return record
