"""One stage's compute (no sockets): what every training method shares, and the interface a
method implements (zdni/methods/: one Stage subclass per method, named by its file).

A Stage reacts to three events, the same whether it runs inside the in-process reference trainer
or inside a worker process fed by the broker:

    train_batch(it, x, y)   the driver's batch alone (full mode's synthetic pass, stages 2..S)
    train_input(it, h, y)   the true input of iteration `it` arrived (x itself for stage 1)
    train_grad(it, g)       the gradient of stage i's output for iteration `it` came back

A method says, as class-level facts the driver, the inbox and the schedule read without a
stage: which stages keep a gradient synthesizer M or an input synthesizer I, what each stage
trains on (x, y), what the driver's batch to it holds, whether activations carry the labels,
which events a stage receives and which one finishes its update (`Wiring`), and the largest
window it is exact with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from zdni.buffer import MemoryRing, Ring
from zdni.config import ConfigError, RunConfig
from zdni.objective import Objective, objective_of
from zdni.optim import Updater, make_updater
from zdni.optimspec import stage_spec
from zdni.rng import UnitStreams, span
from zdni.synthesizer import LocalSynth, StageError, Synth, agreement
from zdni.trust import TrustGate

__all__ = ["Outcome", "Stage", "StageError", "Wiring"]

EventKind = Literal["batch", "input", "grad"]


@dataclass
class Outcome:
    """What an event produced: tensors to send on, and whether the stage's update is done."""

    h_out: torch.Tensor | None = None  # the true activation, for stage i+1
    d_in: torch.Tensor | None = None  # the gradient of the stage's input, for stage i-1
    done: bool = False  # the stage has made its parameter update for this iteration
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Wiring:
    """The events one stage of a method receives and what finishes its update (pure facts,
    read by zdni/schedule.py to order events with several batches in flight)."""

    batch_event: bool  # the driver's batch is an event of its own here (before the input)
    grad_event: bool  # the gradient of this stage's output comes back as an event
    grad_from: EventKind  # the event of stage i+1 that sends that gradient
    done_on: EventKind  # the event that finishes this stage's update of an iteration


class Stage:
    """Stage `index` (1-based) of `count`, with its synthesizers, optimizer and rings.

    Subclasses (zdni/methods/) implement the events; this class holds the module, its optimizer,
    its random stream, the rings and the synthesizers, and the steps methods share.
    """

    name: ClassVar[str] = ""  # the method's name: its file in zdni/methods/
    synthetic: ClassVar[bool] = False  # it uses synthesizers (M, I), so --conditioned applies
    window: ClassVar[int | None] = None  # the most batches in flight it is exact with; None: any

    # -- what the method is (class-level, pure) -------------------------------------------
    @classmethod
    def keeps_M(cls, cfg: RunConfig, index: int, count: int) -> bool:
        """Whether stage `index` of `count` keeps a gradient synthesizer M."""
        return False

    @classmethod
    def keeps_I(cls, cfg: RunConfig, index: int, count: int) -> bool:
        """Whether stage `index` of `count` keeps an input synthesizer I."""
        return False

    @classmethod
    def needs(cls, cfg: RunConfig, index: int, count: int) -> tuple[bool, bool]:
        """(needs x, needs y): what stage `index` trains on each iteration."""
        synth = cls.keeps_M(cfg, index, count) or cls.keeps_I(cfg, index, count)
        return index == 1 or cls.keeps_I(cfg, index, count), index == count or (
            cfg.conditioned and synth)

    @classmethod
    def labels_ride(cls, cfg: RunConfig) -> bool:
        """Whether activations carry the labels (h, y) to the next stage."""
        return True

    @classmethod
    def batch_parts(cls, cfg: RunConfig, index: int, count: int) -> tuple[bool, bool]:
        """(x, y): what the driver's batch to stage `index` holds; (False, False): no batch.
        When labels ride with the activations, stage 1 alone gets a batch and sends y on."""
        if not cls.labels_ride(cfg):
            return cls.needs(cfg, index, count)
        return (True, True) if index == 1 else (False, False)

    @classmethod
    def wiring(cls, index: int, count: int) -> Wiring:
        """The events stage `index` of `count` receives (the default: update on the input)."""
        return Wiring(batch_event=False, grad_event=False, grad_from="input", done_on="input")

    @classmethod
    def largest_window(cls, cfg: RunConfig) -> int:
        """The window a run of this method uses: cfg.inflight (max_inflight or the method's
        default), capped at `window`."""
        return min(cfg.inflight, cls.window or cfg.inflight)

    @classmethod
    def settings(cls, cfg: RunConfig) -> dict[str, Any]:
        """The method's own settings (cfg.method_args, --method-arg) with their defaults; a key
        it does not take, or a bad value, is a ConfigError naming the ones it takes. A method
        with settings overrides this (and calls `take`)."""
        return cls.take(cfg, {})

    @classmethod
    def take(cls, cfg: RunConfig, defaults: dict[str, Any]) -> dict[str, Any]:
        """cfg.method_args over `defaults`, refusing keys that have no default."""
        unknown = sorted(set(cfg.method_args) - set(defaults))
        if unknown:
            takes = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(f"--method-arg {unknown[0]}: mode {cls.name} takes {takes}")
        return {**defaults, **cfg.method_args}

    @classmethod
    def boundary_steps(cls, cfg: RunConfig, x_shape: tuple[int, ...], shape: tuple[int, ...],
                       device: str | torch.device = "cpu"
                       ) -> tuple[Callable[[], None] | None, Callable[[], None] | None]:
        """(exit, entry): one step of the work this method adds at a cut whose activation is
        `shape` per sample (x_shape: the network's input), on a batch of cfg.batch_size: at
        the end of the stage before it (M's prediction and training) and at the start of the
        stage after it (I's); None where it adds nothing. `--balance time` times them
        (zdni/balance.py)."""
        from zdni.balance import synthesizer_steps

        return synthesizer_steps(cfg, x_shape, shape, device, cls.synthetic,
                                 cls.keeps_I(cfg, 2, 2))

    # -- the stage --------------------------------------------------------------------------
    def __init__(
        self,
        cfg: RunConfig,
        index: int,
        module: nn.Module,
        shapes: list[tuple[int, ...]],
        rings: Mapping[str, Ring] | None = None,
        device: str = "cpu",
        synth: Synth | None = None,
        objective: Objective | None = None,
    ) -> None:
        self.cfg = cfg
        self.index = index
        self.count = len(shapes) - 1
        self.shapes = [tuple(s) for s in shapes]  # per sample: the input, then each stage's output
        self.first = index == 1
        self.last = index == self.count
        self.device = torch.device(device)
        self.module = module.to(self.device).train()
        self.frozen = cfg.freeze_stage == index
        self.rings: Mapping[str, Ring] = rings or {
            "out": MemoryRing(cfg.ring_size),
            "in": MemoryRing(cfg.ring_size),
        }
        params = list(self.module.parameters())
        self.updater: Updater | None = None if self.frozen or not params else make_updater(
            stage_spec(cfg), params, cfg)  # optimizer, schedule, clipping (zdni/optim.py)
        self.opt = self.updater.opt if self.updater else None
        self.has_M = self.keeps_M(cfg, index, self.count)
        self.has_I = self.keeps_I(cfg, index, self.count)
        self.synth: Synth = synth or LocalSynth(cfg, index, shapes, self.rings["out"], device,
                                                self.has_M, self.has_I, span(module))
        self.needs_x, self.needs_y = self.needs(cfg, index, self.count)
        # the trust gate (zdni/trust.py): a stage updating from M's synthetic gradients, with
        # more than one batch in flight (at one, M's targets are fresh: the paper's DNI)
        self.gate: TrustGate | None = None
        if self.updater is not None and self.has_M and cfg.trust_gate > 0 \
                and self.largest_window(cfg) > 1:
            self.gate = self.updater.gate = TrustGate(cfg.trust_gate)
        # the synthetic gradients in flight, by iteration, where M lives in another process
        # (the gate's agreement is measured here then; a local M's ring keeps them)
        self._used: dict[int, torch.Tensor] = {}
        self.rng = UnitStreams(cfg.seed, module, self.device)  # dropout: per unit (zdni/rng.py)
        # Only the last stage computes the loss (and imports a user's loss function).
        self.objective = (objective or objective_of(cfg)) if self.last else None

    @property
    def local(self) -> LocalSynth | None:
        """The synthesizers when they live in this process."""
        return self.synth if isinstance(self.synth, LocalSynth) else None

    @property
    def M(self) -> nn.Module | None:
        return self.local.M if self.local else None

    @property
    def I(self) -> nn.Module | None:  # noqa: E743 - the DNI paper's name for it
        return self.local.I if self.local else None

    @property
    def m_opt(self) -> torch.optim.Optimizer | None:
        return self.local.m_opt if self.local else None

    @property
    def i_opt(self) -> torch.optim.Optimizer | None:
        return self.local.i_opt if self.local else None


    def _forward(self, h: torch.Tensor) -> torch.Tensor:
        """The module in training mode, each unit drawing from its own random stream, named by
        the seed and the unit (zdni/rng.py): the same masks in a worker as in process, and
        whatever the cuts."""
        return self.rng.forward(self.module, h)

    def _step(self) -> None:
        if self.updater is not None:
            self.updater.step()

    def _zero(self) -> None:
        self.module.zero_grad(set_to_none=True)

    def parts(self) -> dict[str, nn.Module]:
        """The modules a backup holds, by name (a method adds its own: zdni/checkpoint.py)."""
        found: dict[str, nn.Module] = {"stage": self.module}
        if self.M is not None:
            found["M"] = self.M
        if self.I is not None:
            found["I"] = self.I
        return found

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers a backup holds, by the name of the part they train."""
        opts = {"stage": self.opt, "M": self.m_opt, "I": self.i_opt}
        return {k: v for k, v in opts.items() if v is not None}

    def updaters(self) -> dict[str, Updater]:
        """The updaters whose update counts and schedule positions a backup holds, by the name
        of the part they train (zdni/optim.py)."""
        local = self.local
        ups = {"stage": self.updater, "M": local.m_up if local else None,
               "I": local.i_up if local else None}
        return {k: v for k, v in ups.items() if v is not None}

    def _to_device(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return t.to(self.device, non_blocking=True) if t is not None else None

    def _loss_backward(self, out: torch.Tensor, y: torch.Tensor | None) -> dict[str, float]:
        """The last stage: backward from the loss; returns its value."""
        if y is None:
            raise StageError(f"stage {self.index} is last and needs labels")
        assert self.objective is not None
        loss = self.objective.loss(out, y)  # the run's loss (zdni/objective.py)
        loss.backward()
        return {"loss": loss.item(), **self.objective.train_metrics(out, y)}

    def _backward_output(
        self, it: int, out: torch.Tensor, y: torch.Tensor | None, remember: bool
    ) -> dict[str, float]:
        """Backward from the loss (last stage) or from M's synthetic gradient of `out`
        (remembered in the ring for M's training when the true gradient comes)."""
        if self.last:
            return self._loss_backward(out, y)
        g = self.synth.predict_grad(it, out.detach(), y, remember)
        if remember and self.gate is not None and self.local is None:
            self._used[it] = g.detach()
            for old in [k for k in self._used if k <= it - self.cfg.ring_size]:
                del self._used[old]
        out.backward(g.to(out.device))
        return {}

    def _trust(self, it: int, g: torch.Tensor, metrics: dict[str, float]) -> dict[str, float]:
        """The true gradient `g` of iteration `it` came back and trained M (`metrics`, with its
        grad_cos where M is local): the gate learns how far to trust M's next ones."""
        if self.gate is None:
            return metrics
        if "grad_cos" not in metrics and it in self._used:  # M in another process
            metrics = {**metrics, **agreement(self._used.pop(it), g)}
        if "grad_cos" in metrics:
            self.gate.observe(metrics["grad_cos"])
            metrics = {**metrics, "trust": self.gate.scale}
        return metrics

    # -- events (a method implements those it receives) -----------------------------------
    def train_input(self, it: int, h: torch.Tensor, y: torch.Tensor | None = None) -> Outcome:
        """The true input of iteration `it` (x for stage 1) arrived."""
        raise StageError(f"stage {self.index} ({self.name}) takes no input")

    def train_batch(self, it: int, x: torch.Tensor, y: torch.Tensor | None) -> Outcome:
        """The driver's batch of iteration `it` arrived (an event only where `wiring` says)."""
        raise StageError(f"stage {self.index} has no input synthesizer (mode {self.name})")

    def train_grad(self, it: int, g: torch.Tensor) -> Outcome:
        """The gradient of this stage's output for iteration `it` came back."""
        raise StageError(f"stage {self.index} ({self.name}) takes no gradient")

    @torch.no_grad()
    def evaluate(self, h: torch.Tensor) -> torch.Tensor:
        """Forward-only in eval mode (BatchNorm running statistics, no dropout)."""
        self.module.eval()
        try:
            return self.module(h.to(self.device, non_blocking=True))
        finally:
            self.module.train()
