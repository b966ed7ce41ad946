"""Decoupled greedy learning (DGL: Belilovsky, Eickenberg and Oyallon, "Decoupled greedy
learning of CNNs", ICML 2020; code: eugenium/DGL).

Every stage but the last trains on a local loss: a small auxiliary head on its own output
predicts the targets, and the stage and its head take one step on the run's loss of that
prediction (cross-entropy unless --loss says otherwise; the heads below output class scores,
so other targets need a head factory of their own); the last stage trains on the network's. No gradient travels between stages, so a stage never waits
on a later one and any number of batches may be in flight; a stage's output goes on as its
forward computed it, before its update (the authors' `representation.detach()`).

Settings (--method-arg KEY=VALUE):
    head    mlp | linear | a factory by reference (file.py:name or module:name, beside the model:
            see `head_factory`), called as factory(shape=(C, H, W) or (D,), classes=N). The
            default: for image features the paper's MLP head ("mlp": averaged to 2x2, three
            hidden layers of 4C units with BatchNorm and ReLU, auxiliary_nets_study/models.py),
            for flat features a linear classifier (the DNI-comparison code's last head)

Not here: the paper's asynchronous variant with a replay buffer (section 4). Its rule (replay
the least-reused input, the freshest first: priority_lifo) matters only where a stage consumes
faster than its producer feeds it; stepping R more times per arriving input, as a worker here
would, always picks the newest input again, so it would be R + 1 steps on each batch, not a
replay buffer.

The head is seeded by the cut it serves (zdni/synthesizer.py synthesizer_seed), so every
process builds the same one; a backup holds it and its optimizer (`parts`, `optimizers`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from zdni.config import ConfigError, RunConfig
from zdni.objective import Objective, objective_of
from zdni.optim import Updater, build_optimizer, make_updater
from zdni.optimspec import stage_spec
from zdni.rng import span
from zdni.stage import Outcome, Stage, StageError
from zdni.synthesizer import synthesizer_seed
from zdni.usercode import REFERENCE_RE, call, is_reference

HEADS = ("mlp", "linear")
HEAD_SEED = 1_000_033  # apart from M's and I's seeds at the same cut


def mlp_head(shape: tuple[int, ...], classes: int, layers: int = 3) -> nn.Module:
    """The paper's MLP head on image features (C, H, W): averaged to 2x2, `layers` hidden
    layers of 4C units (Linear, BatchNorm, ReLU), a linear classifier; on flat features (D,),
    the same MLP with D-unit layers."""
    if len(shape) == 3:
        width = 4 * shape[0]
        stem: list[nn.Module] = [nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten()]
    else:
        width = math.prod(shape)
        stem = [nn.Flatten()]
    hidden: list[nn.Module] = []
    for _ in range(layers):
        hidden += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*stem, *hidden, nn.Linear(width, classes))


def linear_head(shape: tuple[int, ...], classes: int) -> nn.Module:
    """A linear classifier on the flattened features."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), classes))


def head_factory(cfg: RunConfig, head: str) -> Callable[..., nn.Module]:
    """The factory of the auxiliary head `head` names. A user's factory must live in the module
    or file of the run's model: a worker imports only code its operator named (--model), and
    importing the model's file already runs all of it (zdni/usercode.py)."""
    if head == "mlp":
        return mlp_head
    if head == "linear":
        return linear_head
    if not is_reference(head):
        raise ConfigError(f"--method-arg head={head!r}: use {', '.join(HEADS)} or a factory "
                          "by reference (file.py:name or module:name)")
    home = REFERENCE_RE.match(cfg.model)
    where = REFERENCE_RE.match(head)
    if home is None or where is None or home["where"] != where["where"]:
        raise ConfigError(f"--method-arg head={head}: a head factory must live beside the model "
                          f"(in {home['where'] if home else 'a model file of yours'}), so a "
                          "worker allowed the model may import it")

    def build(shape: tuple[int, ...], classes: int) -> nn.Module:
        module = call(head, {"shape": shape, "classes": classes})
        if not isinstance(module, nn.Module):
            raise ConfigError(f"--method-arg head={head}: the factory returned a "
                              f"{type(module).__name__}, not an nn.Module")
        return module

    return build


class DecoupledGreedy(Stage):
    name = "dgl"

    @classmethod
    def settings(cls, cfg: RunConfig) -> dict[str, Any]:
        got = cls.take(cfg, {"head": ""})
        if not isinstance(got["head"], str):
            raise ConfigError(f"--method-arg head must be a name or a reference, got "
                              f"{got['head']!r}")
        if got["head"]:
            head_factory(cfg, str(got["head"]))
        return got

    @classmethod
    def needs(cls, cfg: RunConfig, index: int, count: int) -> tuple[bool, bool]:
        """Every stage trains on the labels (its head's loss, or the network's)."""
        return index == 1, True

    @classmethod
    def make_head(cls, cfg: RunConfig, shape: tuple[int, ...], head: str) -> nn.Module:
        """The auxiliary head for features of `shape` (per sample)."""
        if not head:
            return mlp_head(shape, cfg.classes) if len(shape) == 3 else \
                linear_head(shape, cfg.classes)
        return head_factory(cfg, head)(shape=tuple(shape), classes=cfg.classes)

    @classmethod
    def boundary_steps(cls, cfg: RunConfig, x_shape: tuple[int, ...], shape: tuple[int, ...],
                       device: str | torch.device = "cpu"
                       ) -> tuple[Callable[[], None] | None, Callable[[], None] | None]:
        """The auxiliary head at the end of the stage before the cut: its forward, its
        backward into the features and its optimizer step."""
        head = cls.make_head(cfg, shape, str(cls.settings(cfg)["head"])).to(device).train()
        opt = build_optimizer(stage_spec(cfg), list(head.parameters()))
        h = torch.randn(cfg.batch_size, *shape, device=device, requires_grad=True)
        y = torch.randint(0, cfg.classes, (cfg.batch_size,), device=device)
        objective = objective_of(cfg)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            objective.loss(head(h), y).backward()
            opt.step()

        return step, None

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        got = self.settings(self.cfg)
        # Every stage's loss is the run's (zdni/objective.py): a head's on its prediction.
        self.goal: Objective = kwargs.get("objective") or objective_of(self.cfg)
        self.head: nn.Module | None = None
        self.head_up: Updater | None = None
        if not self.last:
            shape = self.shapes[self.index]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(synthesizer_seed(self.cfg, self._cut(), "M") + HEAD_SEED)
                self.head = self.make_head(self.cfg, shape, str(got["head"]))
            self.head = self.head.to(self.device).train()
            params = list(self.head.parameters())
            self.head_up = make_updater(stage_spec(self.cfg), params, self.cfg) if params \
                else None

    def _cut(self) -> int:
        return span(self.module)[1]

    def parts(self) -> dict[str, nn.Module]:
        found = super().parts()
        if self.head is not None:
            found["head"] = self.head
        return found

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        found = super().optimizers()
        if self.head_up is not None:
            found["head"] = self.head_up.opt
        return found

    def updaters(self) -> dict[str, Updater]:
        found = super().updaters()
        if self.head_up is not None:
            found["head"] = self.head_up
        return found

    def _train_on(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """One step of the stage (and its head) on its local loss; returns the output the
        forward computed (before the step) and the loss and accuracy."""
        self._zero()
        if self.head is not None:
            self.head.zero_grad(set_to_none=True)
        out = self._forward(h)
        logits = out if self.head is None else self.head(out)
        loss = self.goal.loss(logits, y)
        loss.backward()
        self._step()
        if self.head_up is not None:
            self.head_up.step()
        prefix = "" if self.last else "aux_"
        metrics = {"loss": loss.item(), **self.goal.train_metrics(logits, y)}
        return out.detach(), {prefix + k: v for k, v in metrics.items()}

    def train_input(self, it: int, h: torch.Tensor, y: torch.Tensor | None = None) -> Outcome:
        """A step on this input's local loss; the output goes on as the forward computed it."""
        if y is None:
            raise StageError(f"stage {self.index} ({self.name}) needs the labels")
        h = h.to(self.device, non_blocking=True).detach()
        out, metrics = self._train_on(h, y.to(self.device, non_blocking=True))
        return Outcome(h_out=None if self.last else out, done=True, metrics=metrics)


METHOD = DecoupledGreedy
