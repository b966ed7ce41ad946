"""The settings of an optimizer as papers specify them (read by zdni/optim.py, which builds
torch's own optimizer, learning-rate schedule and gradient-norm clipping from them), for the
stages and (separately) for the synthesizers M and I. No torch here: the config, which every
process (the broker too) reads, validates them.

Settings (RunConfig fields; M and I take the same ones with lr = synth_lr, each overridden by
cfg.synth_optim, e.g. {"optimizer": "sgd", "clip_norm": 1.0}):

    optimizer     adam | adamw | sgd (torch.optim.Adam, AdamW, SGD)
    weight_decay  Adam and SGD: L2 added to the gradient; AdamW: decoupled (Loshchilov & Hutter,
                  "Decoupled Weight Decay Regularization", ICLR 2019)
    momentum, nesterov   SGD only (Sutskever et al. 2013)
    lr_schedule   constant | step (StepLR: x lr_gamma every lr_step_size units) | cosine
                  (CosineAnnealingLR to lr_min over the run, Loshchilov & Hutter, SGDR, 2017)
    warmup        units of linear warm-up first (LinearLR): lr * (t + 1) / (warmup + 1) for
                  t < warmup (Goyal et al. 2017), then the schedule (SequentialLR)
    schedule_by   iteration | epoch: the unit of warmup, lr_step_size and the cosine's length
    clip_norm     clip the L2 norm of the parameters' gradients to this before each update
                  (torch.nn.utils.clip_grad_norm_); 0 = off. Each stage clips its own
                  gradients: a stage never sees another's, so with several stages this is
                  per-stage clipping, not the whole network's norm of single-process PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

from zdni.errors import ZdniError


class RunConfig(Protocol):
    """What this module reads of zdni.config.RunConfig (which imports this module) or of
    zdni.seqrun.SeqConfig, besides the OptimSpec fields it reads by name."""

    @property
    def lr(self) -> float: ...
    @property
    def synth_lr(self) -> float: ...
    @property
    def synth_optim(self) -> dict[str, Any]: ...
    @property
    def epoch_batches(self) -> int: ...  # batches per epoch, from the data (0: unknown)
    @property
    def epochs(self) -> int: ...
    @property
    def max_iterations(self) -> int | None: ...

__all__ = ["OPTIMIZERS", "SCHEDULES", "OptimError", "OptimSpec", "check", "stage_spec",
           "stretched", "synth_spec", "total_units"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "step", "cosine")
UNITS = ("iteration", "epoch")


class OptimError(ZdniError, ValueError):
    """An optimizer setting is invalid; the message names it and what is allowed."""


@dataclass(frozen=True)
class OptimSpec:
    """One family's settings (the stages', or M's and I's); see the module docstring."""

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    lr_schedule: str = "constant"
    warmup: int = 0
    lr_step_size: int = 1
    lr_gamma: float = 0.1
    lr_min: float = 0.0
    schedule_by: str = "iteration"
    clip_norm: float = 0.0

    def validate(self, who: str) -> OptimSpec:
        """Raise OptimError naming the first bad setting of `who` (the stages, M and I)."""
        def bad(name: str, allowed: str) -> OptimError:
            return OptimError(f"{who}: {name} must be {allowed}, got {getattr(self, name)!r}")

        for name, allowed in (("optimizer", OPTIMIZERS), ("lr_schedule", SCHEDULES),
                              ("schedule_by", UNITS)):
            if getattr(self, name) not in allowed:
                raise bad(name, " or ".join(allowed))
        for name in ("lr", "weight_decay", "momentum", "lr_min", "clip_norm", "lr_gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    0 <= value < math.inf):
                raise bad(name, "a finite number >= 0")
        if self.lr <= 0:
            raise bad("lr", "a positive number")
        for name, low in (("warmup", 0), ("lr_step_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, f"a whole number >= {low}")
        if not isinstance(self.nesterov, bool):
            raise bad("nesterov", "true or false")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise OptimError(f"{who}: nesterov needs optimizer sgd with momentum > 0")
        if self.lr_schedule == "cosine" and self.lr_min > self.lr:
            raise bad("lr_min", f"at most lr ({self.lr})")
        return self


SPEC_FIELDS = tuple(f.name for f in fields(OptimSpec) if f.name != "lr")


def stage_spec(cfg: RunConfig) -> OptimSpec:
    """The stages' settings, from the config's fields."""
    return OptimSpec(lr=cfg.lr, **{name: getattr(cfg, name) for name in SPEC_FIELDS})


def synth_spec(cfg: RunConfig) -> OptimSpec:
    """M's and I's settings: the stages' with lr = synth_lr, overridden by cfg.synth_optim."""
    return replace(stage_spec(cfg), lr=cfg.synth_lr, **cfg.synth_optim)


def check(cfg: RunConfig) -> None:
    """Raise OptimError for a bad setting of the stages' or the synthesizers' optimizer."""
    if not isinstance(cfg.synth_optim, dict) or set(cfg.synth_optim) - set(SPEC_FIELDS):
        unknown = sorted(set(cfg.synth_optim) - set(SPEC_FIELDS)) if isinstance(
            cfg.synth_optim, dict) else cfg.synth_optim
        raise OptimError(f"synth_optim: unknown settings {unknown}; it takes "
                         f"{', '.join(SPEC_FIELDS)}")
    stage_spec(cfg).validate("optimizer of the stages")
    synth = synth_spec(cfg)
    if synth.lr_schedule == "cosine" and synth.lr_min > synth.lr and \
            "lr_min" not in cfg.synth_optim:  # inherited: the stages' floor, over M's peak
        raise OptimError(f"lr_min {synth.lr_min} (where the cosine ends) is above M's and I's "
                         f"learning rate, synth_lr {synth.lr}, and their cosine ends there "
                         f"too: give theirs, --synth-optim lr_min=X with X <= {synth.lr}")
    synth.validate("synth_optim (M and I)")


def stretched(cfg: RunConfig, epochs: int) -> list[str]:
    """Whose cosine schedule (the stages', M's and I's) would span another length if the run
    had `epochs` epochs: a checkpoint's schedule cannot go on over a longer run (torch's
    cosine keeps its length and would climb back to lr after it)."""
    per_epoch = cfg.epoch_batches or None
    found = []
    for who, spec in (("the stages", stage_spec(cfg)), ("M and I", synth_spec(cfg))):
        if spec.lr_schedule == "cosine" and total_units(
                spec, per_epoch, epochs, cfg.max_iterations) != total_units(
                spec, per_epoch, cfg.epochs, cfg.max_iterations):
            found.append(who)
    return found


def total_units(spec: OptimSpec, steps_per_epoch: int | None, epochs: int,
                max_iterations: int | None) -> int | None:
    """The run's length in the schedule's unit: updates (by iteration) or epochs, or None when
    the epoch's length is unknown and no iteration limit bounds the run."""
    if spec.schedule_by == "epoch":
        if max_iterations is not None and steps_per_epoch:
            return min(epochs, math.ceil(max_iterations / steps_per_epoch))
        return epochs
    if steps_per_epoch is None:
        return max_iterations
    run = steps_per_epoch * epochs
    return min(run, max_iterations) if max_iterations is not None else run
