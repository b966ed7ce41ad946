"""The gradient synthesizer M (predicts dL/dh from h) and the input synthesizer I (predicts h from x).

Both may be conditioned on the one-hot label (cDNI): for flat tensors the label is appended as
ten extra features, for images as ten extra constant channels. Both end in a layer whose weight
and bias start at zero, so training starts with zero synthetic gradients and zero synthetic inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zdni.models import NUM_CLASSES

CONV_WIDTH_CAP = 128  # channels: a 1024-channel conv synthesizer would dwarf the stage it serves


def _zero_last(module: nn.Module) -> nn.Module:
    assert isinstance(module, nn.Linear | nn.Conv2d)
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def _with_label(t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Append the one-hot label as features (2-D input) or constant channels (4-D input)."""
    if y is None:
        return t
    onehot = F.one_hot(y, NUM_CLASSES).to(t.dtype)
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
        self, shape: tuple[int, ...], hidden: int, width: int, conditioned: bool
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.conditioned = conditioned
        extra = NUM_CLASSES if conditioned else 0
        if len(self.shape) == 3:
            self.net = _convnet(self.shape[0] + extra, self.shape[0], hidden,
                                min(width, CONV_WIDTH_CAP))
        else:
            d = math.prod(self.shape)
            self.net = _mlp(d + extra, d, hidden, width)

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        flat = h if len(self.shape) == 3 else h.reshape(h.shape[0], -1)
        out = self.net(_with_label(flat, y if self.conditioned else None))
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
    ) -> None:
        super().__init__()
        self.target_shape = tuple(target_shape)
        self.conditioned = conditioned
        extra = NUM_CLASSES if conditioned else 0
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
        out = self.net(_with_label(inp, y if self.conditioned else None))
        return out.reshape(x.shape[0], *self.target_shape)
