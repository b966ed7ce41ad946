"""One stage's compute in every mode: forward, synthetic update, true-gradient update (no sockets).

A Stage reacts to three events, the same whether it runs inside the in-process reference trainer
or inside a worker process fed by the broker:

    train_batch(it, x, y)   full mode, stages 2..S: run on the synthetic input I(x) and update now
    train_input(it, h, y)   the true input of iteration `it` arrived (x itself for stage 1)
    train_grad(it, g)       the gradient of stage i's output for iteration `it` came back

Modes:
    backprop  train_input keeps the graph, train_grad finishes backprop with the true gradient.
    sg        train_input updates at once from M's synthetic gradient and stores h in the
              iteration % N ring; train_grad trains M (L2) on the gradient stage i+1 sent back.
    full      like sg, plus stages 2..S update from I(x) first (train_batch) and, when the true
              input arrives, train I on it and forward it to produce the true signals
              (the activation for stage i+1, the gradient for stage i-1) without updating.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from zdni.buffer import MemoryRing, Ring
from zdni.config import RunConfig
from zdni.inbox import stage_needs
from zdni.metrics import train_accuracy
from zdni.models import make_optimizer
from zdni.rng import UnitStreams, span
from zdni.synthesizer import LocalSynth, StageError, Synth

__all__ = ["Outcome", "Stage", "StageError"]


@dataclass
class Outcome:
    """What an event produced: tensors to send on, and whether the stage's update is done."""

    h_out: torch.Tensor | None = None  # the true activation, for stage i+1
    d_in: torch.Tensor | None = None  # the gradient of the stage's input, for stage i-1
    done: bool = False  # the stage has made its parameter update for this iteration
    metrics: dict[str, float] = field(default_factory=dict)


class Stage:
    """Stage `index` (1-based) of `count`, with its synthesizers, optimizer and rings."""

    def __init__(
        self,
        cfg: RunConfig,
        index: int,
        module: nn.Module,
        shapes: list[tuple[int, ...]],
        rings: Mapping[str, Ring] | None = None,
        device: str = "cpu",
        synth: Synth | None = None,
    ) -> None:
        self.cfg = cfg
        self.index = index
        self.count = len(shapes) - 1
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
        self.opt = None if self.frozen or not params else make_optimizer(cfg, params, cfg.lr)
        self.synth: Synth = synth or LocalSynth(cfg, index, shapes, self.rings["out"], device,
                                                span(module))
        self.has_M = cfg.needs_synth and not self.last
        self.has_I = cfg.mode == "full" and not self.first
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # backprop graphs
        self.rng = UnitStreams(cfg.seed, module, self.device)  # dropout: per unit (zdni/rng.py)

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

    @property
    def needs_x(self) -> bool:
        """Whether this stage trains on the raw input x each iteration."""
        return stage_needs(self.cfg, self.index, self.count)[0]

    @property
    def needs_y(self) -> bool:
        """Whether this stage trains on the labels y each iteration."""
        return stage_needs(self.cfg, self.index, self.count)[1]

    def _forward(self, h: torch.Tensor) -> torch.Tensor:
        """The module in training mode, each unit drawing from its own random stream, named by
        the seed and the unit (zdni/rng.py): the same masks in a worker as in process, and
        whatever the cuts."""
        return self.rng.forward(self.module, h)

    def _step(self) -> None:
        if self.opt is not None:
            self.opt.step()

    def _zero(self) -> None:
        self.module.zero_grad(set_to_none=True)

    def _backward_output(
        self, it: int, out: torch.Tensor, y: torch.Tensor | None, remember: bool
    ) -> dict[str, float]:
        """Backward from the loss (last stage) or from the synthetic gradient of `out`."""
        if self.last:
            if y is None:
                raise StageError(f"stage {self.index} is last and needs labels")
            loss = F.cross_entropy(out, y)
            loss.backward()
            return {"loss": loss.item(), "accuracy": train_accuracy(out, y)}
        g = self.synth.predict_grad(it, out.detach(), y, remember)
        out.backward(g.to(out.device))
        return {}

    # -- events ---------------------------------------------------------------------------
    def train_input(self, it: int, h: torch.Tensor, y: torch.Tensor | None = None) -> Outcome:
        """The true input of iteration `it` (x for stage 1) arrived."""
        h = h.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True) if y is not None else None
        if self.has_I:
            return self._true_pass(it, h)
        h_in = h.detach().requires_grad_(not self.first)
        self._zero()
        out = self._forward(h_in)
        if self.cfg.mode == "backprop" and not self.last:
            self.pending[it] = (h_in, out)
            return Outcome(h_out=out.detach())
        metrics = self._backward_output(it, out, y, remember=True)
        self._step()
        return Outcome(h_out=None if self.last else out.detach(),
                       d_in=None if self.first else h_in.grad, done=True, metrics=metrics)

    def train_batch(self, it: int, x: torch.Tensor, y: torch.Tensor | None) -> Outcome:
        """Full mode, stages 2..S: update now from the synthetic input I(x)."""
        if not self.has_I:
            raise StageError(f"stage {self.index} has no input synthesizer (mode {self.cfg.mode})")
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True) if y is not None else None
        h_syn = self.synth.predict_input(it, x, y).to(self.device, non_blocking=True)
        self._zero()
        out = self._forward(h_syn)
        metrics = self._backward_output(it, out, y, remember=False)
        self._step()
        stored = {"x": x, "h_syn": h_syn}
        if y is not None:
            stored["y"] = y
        self.rings["in"].put(it, stored)
        return Outcome(metrics={f"syn_{k}": v for k, v in metrics.items()})

    def _true_pass(self, it: int, h: torch.Tensor) -> Outcome:
        """Full mode: train I on the true input, then forward it for the true signals."""
        slot = self.rings["in"].get(it)
        if slot is None:
            raise StageError(f"stage {self.index}: true input of iteration {it} came before its batch")
        x, y = slot["x"].to(self.device), slot.get("y")  # from Redis after a restart: on the CPU
        y = y.to(self.device) if y is not None else None
        metrics = self.synth.train_input(it, x, y, h)
        h_in = h.detach().requires_grad_(True)
        self._zero()
        out = self._forward(h_in)
        metrics |= self._backward_output(it, out, y, remember=True)
        self._zero()  # the true pass only produces signals: its parameter gradients are dropped
        return Outcome(h_out=None if self.last else out.detach(), d_in=h_in.grad, done=True,
                       metrics=metrics)

    def train_grad(self, it: int, g: torch.Tensor) -> Outcome:
        """The gradient of this stage's output for iteration `it` came back."""
        g = g.to(self.device, non_blocking=True)
        if self.cfg.mode == "backprop":
            entry = self.pending.pop(it, None)
            if entry is None:
                raise StageError(f"stage {self.index}: gradient of iteration {it} has no forward")
            h_in, out = entry
            self._zero()
            out.backward(g)
            self._step()
            return Outcome(d_in=None if self.first else h_in.grad, done=True)
        if not self.has_M:
            raise StageError(f"stage {self.index} has no gradient synthesizer")
        return Outcome(metrics=self.synth.train_grad(it, g))

    @torch.no_grad()
    def evaluate(self, h: torch.Tensor) -> torch.Tensor:
        """Forward-only in eval mode (BatchNorm running statistics, no dropout)."""
        self.module.eval()
        try:
            return self.module(h.to(self.device, non_blocking=True))
        finally:
            self.module.train()
