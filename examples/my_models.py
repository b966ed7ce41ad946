"""Networks of a user's own, as zdni takes them: a factory returning an nn.Sequential whose
children are the units a cut may fall between.

    zdni train --model examples/my_models.py:cnn --model-arg channels=16 --dataset mnist.npz
"""

from __future__ import annotations

from torch import nn


def cnn(channels: int = 16, classes: int = 10, dropout: float = 0.0,
        in_channels: int = 1, size: int = 28) -> nn.Sequential:
    """Two conv blocks (conv 3x3, BatchNorm, ReLU, max-pool), a dense layer, a classifier."""
    flat = 2 * channels * (size // 4) ** 2
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
                      nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, padding=1),
                      nn.BatchNorm2d(2 * channels), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(dropout)),
        nn.Sequential(nn.Linear(128, classes)),
    )


def mlp(width: int = 256, depth: int = 2, classes: int = 10, inputs: int = 784,
        widths: list[int] | None = None, batchnorm: bool = False) -> nn.Sequential:
    """Hidden layers (Linear, [BatchNorm,] ReLU) of the given `widths` (default: `depth` of
    `width`), then a classifier: one unit each. `widths=[256,256,4096,256,256]` is a
    deliberately unbalanced net (synthetic gradients train deep ReLU nets far better with
    BatchNorm, as in the DNI paper's FCNs)."""
    sizes = [inputs, *(widths if widths is not None else [width] * depth)]
    units: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        head: list[nn.Module] = [nn.Flatten()] if i == 0 else []
        norm: list[nn.Module] = [nn.BatchNorm1d(b)] if batchnorm else []
        units.append(nn.Sequential(*head, nn.Linear(a, b), *norm, nn.ReLU()))
    units.append(nn.Sequential(nn.Linear(sizes[-1], classes)))
    return nn.Sequential(*units)


def bulky(width: int = 256, depth: int = 6, wide: int = 4096,
          wide_at: list[int] | None = None, classes: int = 10) -> nn.Sequential:
    """A deliberately unbalanced net for `--balance time`: `depth` narrow units (Linear,
    BatchNorm, ReLU of `width`), of which those at `wide_at` (default [2, 3]) expand to `wide`
    inside the unit and back, so they cost many times a narrow one while their outputs (and so
    their synthesizers) stay narrow; then a classifier."""
    heavy = set(wide_at if wide_at is not None else [2, 3])
    units: list[nn.Module] = []
    for i in range(depth):
        head: list[nn.Module] = [nn.Flatten(), nn.Linear(784, width)] if i == 0 else \
            [nn.Linear(width, width)]
        if i in heavy:
            head += [nn.ReLU(), nn.Linear(width, wide), nn.ReLU(), nn.Linear(wide, width)]
        units.append(nn.Sequential(*head, nn.BatchNorm1d(width), nn.ReLU()))
    units.append(nn.Sequential(nn.Linear(width, classes)))
    return nn.Sequential(*units)


def plain_mlp(width: int = 300, act: str = "tanh", norm: str | None = "layer",
              blocks: bool = False, classes: int = 10, inputs: int = 784) -> nn.Sequential:
    """The MLP most people write: Flatten, Linear(784, W), [LayerNorm,] act, Linear(W, W),
    [LayerNorm,] act, Linear(W, 10), each module a child (a unit a cut may fall between), or
    with `blocks` grouped as Linear+norm+act so cuts fall after the activation. The models of
    docs/RESULTS.md's window table (issue: DNI with batches in flight)."""
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU}
    layers: list[list[nn.Module]] = [[nn.Flatten()]] if not blocks else []
    for i, (a, b) in enumerate([(inputs, width), (width, width)]):
        layer: list[nn.Module] = [nn.Linear(a, b)]
        layer += [nn.LayerNorm(b)] if norm == "layer" else []
        layer.append(acts[act]())
        if blocks:
            layers.append(([nn.Flatten()] if i == 0 else []) + layer)
        else:
            layers += [[m] for m in layer]
    layers.append([nn.Linear(width, classes)])
    units = [u[0] if len(u) == 1 and not blocks else nn.Sequential(*u) for u in layers]
    return nn.Sequential(*units)
