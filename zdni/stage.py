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
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from zdni.config import RunConfig
from zdni.inbox import stage_needs
from zdni.synthesizer import GradientSynthesizer, InputSynthesizer

Tensors = dict[str, torch.Tensor]


class StageError(RuntimeError):
    """An event cannot be applied (its partner is missing or was overwritten)."""


class Ring(Protocol):
    """The iteration % N buffer of one kind of value for one stage."""

    def put(self, it: int, tensors: Tensors) -> None: ...

    def get(self, it: int) -> Tensors | None: ...


class MemoryRing:
    """An iteration % N ring held in process memory (the in-process trainer's buffer)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: dict[int, tuple[int, Tensors]] = {}

    def put(self, it: int, tensors: Tensors) -> None:
        self.slots[it % self.size] = (it, tensors)

    def get(self, it: int) -> Tensors | None:
        entry = self.slots.get(it % self.size)
        return entry[1] if entry is not None and entry[0] == it else None


@dataclass
class Outcome:
    """What an event produced: tensors to send on, and whether the stage's update is done."""

    h_out: torch.Tensor | None = None  # the true activation, for stage i+1
    d_in: torch.Tensor | None = None  # the gradient of the stage's input, for stage i-1
    done: bool = False  # the stage has made its parameter update for this iteration
    metrics: dict[str, float] = field(default_factory=dict)


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer every stage and synthesizer uses, per the config."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum)
    return torch.optim.Adam(params, lr=lr)


def synthesizer_seed(cfg: RunConfig, index: int) -> int:
    """The seed a stage's synthesizers are built from: same in every process, distinct per stage."""
    return cfg.seed * 7919 + 104729 * index


class Synth(Protocol):
    """Where a stage gets its synthetic gradient and input, and sends their training targets."""

    def predict_grad(self, it: int, h: torch.Tensor, y: torch.Tensor | None,
                     remember: bool = True) -> torch.Tensor: ...

    def train_grad(self, it: int, g: torch.Tensor) -> dict[str, float]: ...

    def predict_input(self, it: int, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor: ...

    def train_input(self, it: int, x: torch.Tensor, y: torch.Tensor | None,
                    h: torch.Tensor) -> dict[str, float]: ...


class LocalSynth:
    """Stage `index`'s M and I with their optimizers, in this process (--synth-placement local).

    predict_grad remembers (h, y, M's answer) in the 'out' ring so that train_grad can pair the
    gradient that comes back later with the activation it belongs to.
    """

    def __init__(self, cfg: RunConfig, index: int, shapes: list[tuple[int, ...]],
                 out_ring: Ring | None = None, device: str = "cpu") -> None:
        self.cfg = cfg
        self.index = index
        count = len(shapes) - 1
        self.ring: Ring = out_ring or MemoryRing(cfg.ring_size)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(synthesizer_seed(cfg, index))
        self.M: nn.Module | None = None
        self.I: nn.Module | None = None  # noqa: E741
        if cfg.needs_synth and index < count:
            self.M = GradientSynthesizer(
                shapes[index], cfg.synth_hidden, cfg.synth_width, cfg.conditioned
            ).to(device)
        if cfg.mode == "full" and index > 1:
            self.I = InputSynthesizer(
                shapes[0], shapes[index - 1], cfg.synth_hidden, cfg.synth_width, cfg.conditioned
            ).to(device)
        torch.random.set_rng_state(generator_state)
        self.m_opt = make_optimizer(cfg, list(self.M.parameters()), cfg.synth_lr) if self.M else None
        self.i_opt = make_optimizer(cfg, list(self.I.parameters()), cfg.synth_lr) if self.I else None

    def _label(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return y if self.cfg.conditioned else None

    def predict_grad(self, it: int, h: torch.Tensor, y: torch.Tensor | None,
                     remember: bool = True) -> torch.Tensor:
        if self.M is None:
            raise StageError(f"stage {self.index} has no gradient synthesizer")
        h = h.detach()
        with torch.no_grad():
            g = self.M(h, self._label(y))
        if not remember:  # full mode's synthetic pass: no true gradient will come for this h
            return g
        stored = {"h": h, "g": g}
        if y is not None and self.cfg.conditioned:
            stored["y"] = y
        self.ring.put(it, stored)
        return g

    def train_grad(self, it: int, g: torch.Tensor) -> dict[str, float]:
        if self.M is None or self.m_opt is None:
            raise StageError(f"stage {self.index} has no gradient synthesizer")
        slot = self.ring.get(it)
        if slot is None:
            raise StageError(f"stage {self.index}: slot of iteration {it} was overwritten")
        self.m_opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.M(slot["h"], slot.get("y")), g)
        loss.backward()
        self.m_opt.step()
        return {"grad_loss": loss.item()}

    def predict_input(self, it: int, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.I is None:
            raise StageError(f"stage {self.index} has no input synthesizer")
        with torch.no_grad():
            return self.I(x, self._label(y))

    def train_input(self, it: int, x: torch.Tensor, y: torch.Tensor | None,
                    h: torch.Tensor) -> dict[str, float]:
        if self.I is None or self.i_opt is None:
            raise StageError(f"stage {self.index} has no input synthesizer")
        self.i_opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.I(x, self._label(y)), h)
        loss.backward()
        self.i_opt.step()
        return {"input_loss": loss.item()}


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
        self.synth: Synth = synth or LocalSynth(cfg, index, shapes, self.rings["out"], device)
        self.has_M = cfg.needs_synth and not self.last
        self.has_I = cfg.mode == "full" and not self.first
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # backprop graphs

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
            return {"loss": loss.item()}
        g = self.synth.predict_grad(it, out.detach(), y, remember)
        out.backward(g.to(out.device))
        return {}

    # -- events ---------------------------------------------------------------------------
    def train_input(self, it: int, h: torch.Tensor, y: torch.Tensor | None = None) -> Outcome:
        """The true input of iteration `it` (x for stage 1) arrived."""
        h = h.to(self.device)
        y = y.to(self.device) if y is not None else None
        if self.has_I:
            return self._true_pass(it, h)
        h_in = h.detach().requires_grad_(not self.first)
        self._zero()
        out = self.module(h_in)
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
        x = x.to(self.device)
        y = y.to(self.device) if y is not None else None
        h_syn = self.synth.predict_input(it, x, y).to(self.device)
        self._zero()
        out = self.module(h_syn)
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
        x, y = slot["x"], slot.get("y")
        metrics = self.synth.train_input(it, x, y, h)
        h_in = h.detach().requires_grad_(True)
        self._zero()
        out = self.module(h_in)
        metrics |= self._backward_output(it, out, y, remember=True)
        self._zero()  # the true pass only produces signals: its parameter gradients are dropped
        return Outcome(h_out=None if self.last else out.detach(), d_in=h_in.grad, done=True,
                       metrics=metrics)

    def train_grad(self, it: int, g: torch.Tensor) -> Outcome:
        """The gradient of this stage's output for iteration `it` came back."""
        g = g.to(self.device)
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
            return self.module(h.to(self.device))
        finally:
            self.module.train()
