"""The gradient synthesizer M (predicts dL/dh from h), the input synthesizer I (predicts h from x),
and LocalSynth, which holds a stage's M and I with their optimizers and training rules.

Both may be conditioned on the one-hot label (cDNI): for flat tensors the label is appended as
ten extra features, for images as ten extra constant channels. Both end in a layer whose weight
and bias start at zero, so training starts with zero synthetic gradients and zero synthetic inputs.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from zdni.buffer import MemoryRing, Ring
from zdni.config import RunConfig
from zdni.models import NUM_CLASSES
from zdni.objective import conditioning_classes
from zdni.optim import Updater, make_updater
from zdni.optimspec import synth_spec

CONV_WIDTH_CAP = 128  # channels: a 1024-channel conv synthesizer would dwarf the stage it serves


def _zero_last(module: nn.Module) -> nn.Module:
    assert isinstance(module, nn.Linear | nn.Conv2d)
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def _with_label(t: torch.Tensor, y: torch.Tensor | None, classes: int) -> torch.Tensor:
    """Append the one-hot label as features (2-D input) or constant channels (4-D input); a
    label shaped per sample (a chunk's targets) is one-hot at every position, flattened."""
    if y is None:
        return t
    # float targets (regression, multi-label) condition as their values (zdni/objective.py)
    onehot = y.to(t.dtype) if y.is_floating_point() else F.one_hot(y, classes).to(t.dtype)
    onehot = onehot.reshape(len(y), -1)
    if t.dim() == 2:
        return torch.cat([t, onehot], dim=1)
    planes = onehot[:, :, None, None].expand(-1, -1, *t.shape[2:])
    return torch.cat([t, planes], dim=1)


def _mlp(d_in: int, d_out: int, hidden: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(hidden):
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    layers.append(_zero_last(nn.Linear(d_in, d_out)))
    return nn.Sequential(*layers)


def _convnet(c_in: int, c_out: int, hidden: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(hidden):
        layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU()]
        c_in = width
    layers.append(_zero_last(nn.Conv2d(c_in, c_out, 3, padding=1)))
    return nn.Sequential(*layers)


class GradientSynthesizer(nn.Module):
    """M: predicts the gradient of the loss with respect to a stage's output h, from h (and y)."""

    def __init__(
        self, shape: tuple[int, ...], hidden: int, width: int, conditioned: bool,
        classes: int = NUM_CLASSES, labels: int = 1,
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.conditioned = conditioned
        self.classes = classes
        extra = classes * labels if conditioned else 0  # labels: positions per sample
        if len(self.shape) == 3:
            self.net = _convnet(self.shape[0] + extra, self.shape[0], hidden,
                                min(width, CONV_WIDTH_CAP))
        else:
            d = math.prod(self.shape)
            self.net = _mlp(d + extra, d, hidden, width)

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The predicted gradient of h: (B, *shape)."""
        flat = h if len(self.shape) == 3 else h.reshape(h.shape[0], -1)
        out = self.net(_with_label(flat, y if self.conditioned else None, self.classes))
        return out.reshape(h.shape)


class InputSynthesizer(nn.Module):
    """I: predicts a stage's input from the network's input x (and y)."""

    def __init__(
        self,
        x_shape: tuple[int, ...],
        target_shape: tuple[int, ...],
        hidden: int,
        width: int,
        conditioned: bool,
        classes: int = NUM_CLASSES,
        labels: int = 1,
    ) -> None:
        super().__init__()
        self.target_shape = tuple(target_shape)
        self.conditioned = conditioned
        self.classes = classes
        extra = classes * labels if conditioned else 0
        self.image = len(self.target_shape) == 3 and len(x_shape) == 3
        if self.image:
            c_out, height, width_px = self.target_shape
            w = min(width, CONV_WIDTH_CAP)
            self.net = nn.Sequential(
                nn.Conv2d(x_shape[0] + extra, w, 3, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d((height, width_px)),
                _convnet(w, c_out, hidden, w),
            )
        else:
            self.net = _mlp(math.prod(x_shape) + extra, math.prod(self.target_shape), hidden, width)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        inp = x if self.image else x.reshape(x.shape[0], -1)
        out = self.net(_with_label(inp, y if self.conditioned else None, self.classes))
        return out.reshape(x.shape[0], *self.target_shape)


def agreement(synthetic: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """How well a synthetic gradient matched the true one, scale-free: their cosine similarity
    (grad_cos, 1 is perfect, 0 no better than noise) and the error's norm relative to the true
    gradient's (grad_err: 1 is what predicting zero scores)."""
    s, t = synthetic.to(true.device).flatten().double(), true.flatten().double()
    norm = t.norm().item()
    cos = F.cosine_similarity(s, t, dim=0).item() if norm > 0 and s.norm() > 0 else 0.0
    return {"grad_cos": cos, "grad_err": (s - t).norm().item() / norm if norm > 0 else 0.0}


class StageError(RuntimeError):
    """An event cannot be applied (its partner is missing or was overwritten)."""


def synthesizer_seed(cfg: RunConfig, boundary: int, kind: str = "M") -> int:
    """The seed M (or I) is built from, named by the boundary it serves: the index of the model's
    unit right after the cut (zdni/rng.py), never by a stage number: the same in every process
    and wherever the other cuts fall."""
    return cfg.seed * 7919 + 104729 * boundary + (15485863 if kind == "I" else 0)


class Synth(Protocol):
    """Where a stage gets its synthetic gradient and input, and sends their training targets."""

    def predict_grad(self, it: int, h: torch.Tensor, y: torch.Tensor | None,
                     remember: bool = True) -> torch.Tensor: ...

    def train_grad(self, it: int, g: torch.Tensor) -> dict[str, float]: ...

    def predict_input(self, it: int, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor: ...

    def train_input(self, it: int, x: torch.Tensor, y: torch.Tensor | None,
                    h: torch.Tensor) -> dict[str, float]: ...


class LocalSynth:
    """Stage `index`'s M and I (those its method keeps) with their optimizers, in this process
    (--synth-placement local).

    predict_grad remembers (h, y, M's answer) in the 'out' ring so that train_grad can pair the
    gradient that comes back later with the activation it belongs to.
    """

    def __init__(self, cfg: RunConfig, index: int, shapes: list[tuple[int, ...]],
                 out_ring: Ring | None = None, device: str = "cpu", with_M: bool = False,
                 with_I: bool = False, span: tuple[int, int] | None = None) -> None:
        self.cfg = cfg
        self.index = index
        self.ring: Ring = out_ring or MemoryRing(cfg.ring_size)
        # span: the stage's units first..end-1 in the whole model (zdni.rng.spans); M serves the
        # boundary at `end`, I the one at `first`, and each is seeded by its boundary
        first, end = span if span is not None else (index - 1, index)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(synthesizer_seed(cfg, end, "M"))
        self.M: GradientSynthesizer | None = None
        self.I: nn.Module | None = None  # noqa: E741
        if with_M:
            self.M = GradientSynthesizer(
                shapes[index], cfg.synth_hidden, cfg.synth_width, cfg.conditioned,
                conditioning_classes(cfg), math.prod(cfg.label_shape),
            ).to(device)
        torch.manual_seed(synthesizer_seed(cfg, first, "I"))
        if with_I:
            self.I = InputSynthesizer(
                shapes[0], shapes[index - 1], cfg.synth_hidden, cfg.synth_width, cfg.conditioned,
                conditioning_classes(cfg), math.prod(cfg.label_shape),
            ).to(device)
        torch.random.set_rng_state(generator_state)
        spec = synth_spec(cfg)
        self.m_up: Updater | None = make_updater(spec, list(self.M.parameters()), cfg) \
            if self.M else None
        self.i_up: Updater | None = make_updater(spec, list(self.I.parameters()), cfg) \
            if self.I else None
        self.m_opt = self.m_up.opt if self.m_up else None
        self.i_opt = self.i_up.opt if self.i_up else None

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
        y = slot.get("y")  # a slot read back from Redis (a restarted worker) is on the CPU
        h = slot["h"].to(g.device)
        loss = F.mse_loss(self.M(h, y.to(g.device) if y is not None else None), g)
        loss.backward()
        assert self.m_up is not None
        self.m_up.step()
        return {"grad_loss": loss.item(), **agreement(slot["g"], g)}

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
        assert self.i_up is not None
        self.i_up.step()
        return {"input_loss": loss.item()}
