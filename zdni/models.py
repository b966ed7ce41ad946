"""The model zoo, each model a list of units, and how units are cut into pipeline stages.

A unit is the smallest piece a cut may not split (a layer with its normalization, activation,
pooling and dropout). A stage is one or more consecutive units. Composing the stages in order is
exactly the whole model: same modules, same parameters.

Models:
    seed-mlp  the seed report's MNIST network: 784-200 sigmoid-10 (2 units)
    fcnK      the DNI paper's MNIST FCN with K layers in all (K = 3..6 there, 2..16 here): K-1
              hidden layers of 256 units (Linear+BatchNorm+ReLU) and a linear output layer
              (K units); `--model-arg width=W` widens the hidden layers
    (the CNNs take `--model-arg channels=C`: their convolutions' width, 32 and 128 by default)
    seed-cnn  the seed report's CIFAR-10 CNN: conv3x3x32, conv3x3x32, maxpool, dropout 0.25,
              conv3x3x64, conv3x3x64, maxpool, dropout 0.5, dense 512, dropout 0.5, dense 10
    dni-cnn   the DNI paper's CIFAR-10 CNN: 3 conv layers of 128 5x5 filters with BatchNorm and
              ReLU (max-pooling after the first two), then a linear output layer (4 units)
    copy-lstm a stacked LSTM (copy-gru: GRU) for chunked Copy (--dataset copy-L<len>-T<steps>),
              one unit per layer (--model-arg layers=3 hidden=64; tdni=0 turns DNI through
              time off); zdni/recurrent.py ChunkLayer
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from zdni.config import ConfigError, RunConfig
from zdni.recurrent import ChunkLayer, copy_stack
from zdni.usercode import UserCodeError, call, is_reference

INPUT_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
NUM_CLASSES = 10  # of the zoo's datasets; a user's data set has cfg.classes
ZOO_ARGS = {"fcnK": {"width"}, "seed-cnn": {"channels"}, "dni-cnn": {"channels"},
            "copy-lstm": {"layers", "hidden", "tdni"}, "copy-gru": {"layers", "hidden", "tdni"}}


def input_shape(cfg: RunConfig) -> tuple[int, ...]:
    """The per-sample input shape: read from the data (zdni/plan.py), or the zoo dataset's."""
    if cfg.input_shape is not None:
        return tuple(cfg.input_shape)
    if cfg.dataset not in INPUT_SHAPES:
        raise ConfigError(f"dataset {cfg.dataset}: the input shape is read from the data first")
    return INPUT_SHAPES[cfg.dataset]


def user_units(ref: str, args: dict[str, Any] | None = None) -> list[nn.Module]:
    """The units of a user's model: the children of the nn.Sequential its factory returns, or
    the modules of the list it returns."""
    built = call(ref, args)
    if isinstance(built, nn.Sequential):
        units = list(built.children())
    elif isinstance(built, list | tuple) and all(isinstance(m, nn.Module) for m in built):
        units = list(built)
    else:
        raise UserCodeError(f"{ref}: the factory returned a {type(built).__name__}; expected an "
                            "nn.Sequential or a list of modules")
    if not units:
        raise UserCodeError(f"{ref}: the factory returned no modules")
    return units


def build_units(model: str, args: dict[str, Any] | None = None) -> list[nn.Module]:
    """The model's units in order, freshly initialized from torch's global RNG."""
    if is_reference(model):
        return user_units(model, args)
    args = dict(args or {})
    allowed = ZOO_ARGS.get("fcnK" if model.startswith("fcn") else model, set())
    if set(args) - allowed:
        takes = f"only {', '.join(sorted(allowed))}" if allowed else "no model arguments"
        raise ConfigError(f"model {model} is a zoo model: it takes {takes}, not "
                          f"{', '.join(sorted(set(args) - allowed))}")
    for name, value in args.items():
        low = 0 if name == "tdni" else 1  # tdni: DNI through time in each layer (1) or not (0)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 65536:
            raise ConfigError(f"model {model}: {name} must be a whole number {low}..65536, "
                              f"got {value!r}")
    if model in ("copy-lstm", "copy-gru"):
        return list(copy_stack(args.get("layers", 3), args.get("hidden", 64), 8, model[5:],
                               bool(args.get("tdni", 1))))
    if model == "seed-mlp":
        return [
            nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.Sigmoid()),
            nn.Sequential(nn.Linear(200, NUM_CLASSES)),
        ]
    if model.startswith("fcn") and model[3:].isdigit():
        layers = int(model[3:])
        if not 2 <= layers <= 16:
            raise ConfigError(f"model {model}: fcnK needs 2 <= K <= 16")
        width = args.get("width", 256)
        units: list[nn.Module] = []
        width_in = 784
        for i in range(layers - 1):
            block: list[nn.Module] = [nn.Flatten()] if i == 0 else []
            block += [nn.Linear(width_in, width), nn.BatchNorm1d(width), nn.ReLU()]
            units.append(nn.Sequential(*block))
            width_in = width
        units.append(nn.Sequential(nn.Linear(width_in, NUM_CLASSES)))
        return units
    if model == "seed-cnn":
        c = args.get("channels", 32)
        return [
            nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU()),
            nn.Sequential(
                nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25)
            ),
            nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU()),
            nn.Sequential(
                nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Dropout(0.5)
            ),
            nn.Sequential(nn.Flatten(), nn.Linear(2 * c * 8 * 8, 512), nn.ReLU(), nn.Dropout(0.5)),
            nn.Sequential(nn.Linear(512, NUM_CLASSES)),
        ]
    if model == "dni-cnn":
        c = args.get("channels", 128)

        def conv(c_in: int, pool: bool) -> nn.Module:
            parts: list[nn.Module] = [
                nn.Conv2d(c_in, c, 5, padding=2), nn.BatchNorm2d(c), nn.ReLU()
            ]
            if pool:
                parts.append(nn.MaxPool2d(3, stride=2, padding=1))
            return nn.Sequential(*parts)

        return [
            conv(3, pool=True),
            conv(c, pool=True),
            conv(c, pool=False),
            nn.Sequential(nn.Flatten(), nn.Linear(c * 8 * 8, NUM_CLASSES)),
        ]
    raise ConfigError(f"unknown model {model!r}")


def cut_points(units: int, stages: int | None = None, cuts: Sequence[int] | None = None) -> list[int]:
    """Where each stage starts, as unit indices (the first is 0). Raises ConfigError.

    With `stages`, units are shared out as evenly as possible, later stages taking the extra
    ones (the last stage also computes the loss). With `cuts`, each cut is the index of the
    first unit of a stage after the first, strictly increasing inside 1..units-1.
    """
    if cuts:
        points = [0, *cuts]
        if any(b <= a for a, b in zip(points, points[1:])) or points[-1] >= units:
            raise ConfigError(
                f"cuts {list(cuts)} must increase strictly within 1..{units - 1} for {units} units"
            )
        return points
    if stages is None or not 1 <= stages <= units:
        raise ConfigError(f"stages must be within 1..{units} for this model, got {stages}")
    base, extra = divmod(units, stages)
    sizes = [base + (1 if i >= stages - extra else 0) for i in range(stages)]
    return [sum(sizes[:i]) for i in range(stages)]


def cut(units: Sequence[nn.Module], points: Sequence[int]) -> list[nn.Sequential]:
    """Group units into stages starting at `points`; each stage records the index of its first
    unit in the whole model (`first_unit`: its units' random streams are named by it, zdni/rng.py)."""
    bounds = [*points, len(units)]
    stages = []
    for a, b in zip(bounds, bounds[1:]):
        stage = nn.Sequential(*units[a:b])
        object.__setattr__(stage, "first_unit", a)  # a plain attribute, not a submodule
        stages.append(stage)
    return stages


def build_stages(cfg: RunConfig, units: list[nn.Module] | None = None) -> list[nn.Sequential]:
    """The run's stages, initialized from cfg.seed so every process builds the same weights
    (or cut from the given units: a live model, in process)."""
    if units is None:
        torch.manual_seed(cfg.seed)
        units = build_units(cfg.model, cfg.model_args)
    stages = cut(units, cut_points(len(units), cfg.stages, cfg.cuts))
    for stage in stages:  # a recurrent layer's own M (DNI in time) takes the run's recipe
        for layer in stage.modules():
            if isinstance(layer, ChunkLayer):
                layer.follow(cfg)
    if cfg.freeze_stage is not None and not 1 <= cfg.freeze_stage <= len(stages):
        raise ConfigError(f"freeze_stage {cfg.freeze_stage} is not a stage 1..{len(stages)}")
    return stages


def stage_count(cfg: RunConfig) -> int:
    """How many stages the config gives, without building weights."""
    return len(cut_points(len(build_units(cfg.model, cfg.model_args)), cfg.stages, cfg.cuts))


def stage_shapes(stages: Sequence[nn.Module], in_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-sample shapes at every boundary: [input, after stage 1, ..., after stage S]."""
    shapes = [tuple(in_shape)]
    h = torch.zeros(2, *in_shape)
    with torch.no_grad():
        for stage in stages:
            was_training = stage.training
            stage.eval()  # eval: a shape probe must not move BatchNorm running statistics
            h = stage(h)
            stage.train(was_training)
            shapes.append(tuple(h.shape[1:]))
    return shapes

