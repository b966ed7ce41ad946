"""A regression network of a user's own: the model, its data (float targets), and a metric.

    zdni train --model examples/regression.py:net --dataset examples/regression.py:data \\
        --loss torch.nn.functional:mse_loss --metric examples/regression.py:mae \\
        --mode sg --conditioned --val-split 0.1 --epochs 5 --lr 3e-3 \\
        --optimizer adamw --weight-decay 0.01 --lr-schedule cosine --warmup 50 --clip-norm 1

cDNI conditions M on the target values themselves (there are no classes to one-hot).
"""

from __future__ import annotations

import torch
from torch import nn


def net(inputs: int = 8, width: int = 64) -> nn.Sequential:
    """An MLP of three units (a cut may fall between them): inputs -> width -> width -> 1."""
    return nn.Sequential(nn.Sequential(nn.Linear(inputs, width), nn.ReLU()),
                         nn.Sequential(nn.Linear(width, width), nn.ReLU()),
                         nn.Sequential(nn.Linear(width, 1)))


def data(samples: int = 8192, inputs: int = 8, noise: float = 0.05, seed: int = 0
         ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test) of y = sin(x . w) + noise, x ~ N(0, I): float targets of shape (N, 1)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(inputs, 1, generator=g) / inputs ** 0.5
    x = torch.randn(samples + samples // 4, inputs, generator=g)
    y = torch.sin(x @ w) + noise * torch.randn(len(x), 1, generator=g)
    return (x[:samples], y[:samples]), (x[samples:], y[samples:])


def mae(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of a batch."""
    return (out - y).abs().mean()


mae.higher_is_better = False  # type: ignore[attr-defined]  # "best" is the lowest
