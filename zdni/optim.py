"""Optimizers as papers specify them: torch's own optimizer, learning-rate schedule and
gradient-norm clipping (the settings: zdni/optimspec.py), for the stages and for M and I.

An Updater is what one parameter update does: clip the gradients' norm, step the optimizer,
then step the schedule once per update (by iteration) or once per `steps_per_epoch` updates
(by epoch). A stage makes exactly one update per iteration in every mode, in a worker as in
the in-process runner, so counting updates steps the schedule the same way in both. Where an
iteration makes several updates (a recurrent network updating after every chunk of a batch of
sequences) or none (a recurrent layer's M at a sequence's first chunk, with nothing to learn
from yet), the updates are `step(advance=False)` and the iteration ends with `advance()`: the
schedule still counts iterations.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

from zdni.optimspec import OptimError, OptimSpec, RunConfig, total_units
from zdni.trust import TrustGate

__all__ = ["Updater", "build_optimizer", "build_schedule", "make_updater"]


FUSED_DEVICES = frozenset({"cpu", "cuda"})  # where torch has the fused kernels (torch >= 2.4)


def fusable(params: list[nn.Parameter]) -> bool:
    """Whether torch's fused optimizer step applies: every parameter a real floating-point
    tensor on the CPU or a CUDA device (not meta, complex or sparse)."""
    return bool(params) and all(p.is_floating_point() and not p.is_sparse
                                and p.device.type in FUSED_DEVICES for p in params)


def build_optimizer(spec: OptimSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """torch's optimizer for `spec`, with its fused step (`fused=True`: one kernel over each
    parameter instead of about ten tensor operations; on this machine's CPU a 2.1 M-parameter
    Adam step takes 1.5 ms instead of 11, docs/BENCHMARKS.md section 8) wherever `fusable`.
    The fused step computes the same update in another order of floating-point operations:
    it differs from the unfused one in the last bits, and equals itself run to run."""
    fused = True if fusable(params) else None  # None: torch's own choice (foreach or not)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                               nesterov=spec.nesterov, weight_decay=spec.weight_decay,
                               fused=fused)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay,
                                 fused=fused)
    return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=fused)


def build_schedule(spec: OptimSpec, opt: torch.optim.Optimizer,
                   total: int | None) -> lr_scheduler.LRScheduler | None:
    """torch's scheduler for `spec` over `total` units (None: constant without warm-up)."""
    main: lr_scheduler.LRScheduler | None = None
    if spec.lr_schedule == "step":
        main = lr_scheduler.StepLR(opt, step_size=spec.lr_step_size, gamma=spec.lr_gamma)
    elif spec.lr_schedule == "cosine":
        if total is None:
            raise OptimError("lr_schedule cosine needs the run's length: the data set has no "
                             "length, so give max_iterations (--max-iterations)")
        main = lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - spec.warmup),
                                              eta_min=spec.lr_min)
    if not spec.warmup:
        return main
    warm = lr_scheduler.LinearLR(opt, start_factor=1 / (spec.warmup + 1), end_factor=1.0,
                                 total_iters=spec.warmup)
    if main is None:
        return warm
    return lr_scheduler.SequentialLR(opt, [warm, main], milestones=[spec.warmup])


class Updater:
    """An optimizer with its schedule and clipping: `step()` is one update (module docstring)."""

    def __init__(self, spec: OptimSpec, params: Iterable[nn.Parameter],
                 steps_per_epoch: int | None = None, total: int | None = None) -> None:
        self.spec = spec
        self.params = list(params)
        self.opt = build_optimizer(spec, self.params)
        self.steps_per_epoch = steps_per_epoch
        self.schedule = build_schedule(spec, self.opt, total)
        self.updates = 0
        # a stage driven by synthetic gradients: each update's learning rate scaled by how well
        # they have agreed with the true ones (zdni/trust.py); None: full steps
        self.gate: TrustGate | None = None
        self.stepped = False  # has the optimizer stepped yet (in this process)

    @property
    def lr(self) -> float:
        """The learning rate of the next update."""
        return float(self.opt.param_groups[0]["lr"])

    def zero_grad(self) -> None:
        """Drop the parameters' gradients (set them to None)."""
        self.opt.zero_grad(set_to_none=True)

    def step(self, advance: bool = True) -> None:
        """Clip, update (at the gate's share of the learning rate, if gated), and (unless
        `advance` is False: the iteration goes on) advance the schedule by one iteration."""
        if self.spec.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.clip_norm)
        if self.gate is None:
            self.opt.step()
        else:
            scale = self.gate.scale
            rates = [group["lr"] for group in self.opt.param_groups]
            for group, lr in zip(self.opt.param_groups, rates):
                group["lr"] = lr * scale
            try:
                self.opt.step()
            finally:  # the schedule goes on from the unscaled rate
                for group, lr in zip(self.opt.param_groups, rates):
                    group["lr"] = lr
        self.stepped = True
        if advance:
            self.advance()

    def advance(self) -> None:
        """One iteration done: count it, and step the schedule where its unit ends."""
        self.updates += 1  # iterations, not optimizer steps (the name is a backup's key)
        if self.schedule is None:
            return
        if self.spec.schedule_by == "iteration" or (
                self.steps_per_epoch and self.updates % self.steps_per_epoch == 0):
            if self.stepped:
                self.schedule.step()
                return
            with warnings.catch_warnings():  # iterations without an update (M without a
                # target yet) count all the same: torch's warning of a schedule stepped
                # before its optimizer is meant for a loop that forgot the update
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step",
                                        UserWarning)
                self.schedule.step()

    def state_dict(self) -> dict[str, Any]:
        """What a backup needs besides the optimizer's own state: the update count and the
        schedule's position (plain numbers and lists)."""
        return {"updates": self.updates,
                "schedule": self.schedule.state_dict() if self.schedule is not None else None,
                "gate": self.gate.state_dict() if self.gate is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned (after the optimizer's own state is loaded)."""
        self.updates = int(state["updates"])
        if self.schedule is not None and state.get("schedule") is not None:
            self.schedule.load_state_dict(state["schedule"])
        if self.gate is not None and state.get("gate") is not None:
            self.gate.load_state_dict(state["gate"])


def make_updater(spec: OptimSpec, params: list[nn.Parameter], cfg: RunConfig) -> Updater:
    """The Updater of `params` for a run: the schedule's length from the run's epochs,
    iterations per epoch (cfg.epoch_batches, read from the data by the plan) and limit."""
    per_epoch = cfg.epoch_batches or None
    total = total_units(spec, per_epoch, cfg.epochs, cfg.max_iterations)
    return Updater(spec, params, per_epoch, total)
