"""The objective: the loss the last stage minimizes and the metric evaluation reports, with the
targets they take.

    loss    cross_entropy (default: class indices, one per sample or one per position), or the
            user's function by reference, `--loss file.py:fn` / `package.module:fn`, called as
            fn(output, target) and returning the batch's mean loss as a scalar tensor (torch's
            losses do: `--loss torch.nn.functional:mse_loss`); a reference to an nn.Module
            class (`torch.nn:BCEWithLogitsLoss`) is instantiated once, without arguments.
    metric  accuracy (default with cross_entropy: a sample is right when every one of its
            positions is), loss (the default with a user's loss), or the user's function by
            reference, fn(output, target) -> the batch's mean as a float or scalar tensor.
            Evaluation weights each batch by its number of samples.

Whether higher is better ("best", --keep-best) is metric_goal: max or min; without it,
accuracy is max, loss is min, and a user's metric says so by a `higher_is_better` attribute
(as torchmetrics' metrics do), or the run is refused before it starts.

Targets: class indices are int64 within 0..classes-1; anything else the loss accepts is
float32 (regression values, multi-label 0/1, per-position values), of the per-sample shape the
data has (cfg.label_shape; cfg.target_dtype says which). Both are checked on every receive.

cDNI with float targets conditions M and I on the target values themselves, appended as
features (or constant planes) where class indices are appended one-hot (zdni/synthesizer.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zdni.config import ConfigError, RunConfig
from zdni.inbox import check_labels, check_tensor
from zdni.usercode import UserCodeError, is_reference, resolve

__all__ = ["ACCURACY", "CROSS_ENTROPY", "LOSS", "Objective", "check_targets",
           "conditioning_classes", "counts_samples", "objective_of"]

CROSS_ENTROPY = "cross_entropy"
ACCURACY, LOSS = "accuracy", "loss"
TARGET_DTYPES = {"int64": torch.int64, "float32": torch.float32}
Fn = Callable[[torch.Tensor, torch.Tensor], Any]


def accuracy_sum(out: torch.Tensor, y: torch.Tensor) -> float:
    """Samples whose every position's argmax is its class index."""
    right = (out.argmax(1) == y).reshape(len(y), -1).all(dim=1)
    return float(right.sum())


class Objective:
    """A run's loss and metric (module docstring)."""

    def __init__(self, loss: str = CROSS_ENTROPY, metric: str = "", goal: str = "",
                 loss_fn: Fn | None = None, metric_fn: Fn | None = None) -> None:
        self.loss_name = loss
        self.default_loss = loss == CROSS_ENTROPY and loss_fn is None
        self._loss: Fn = F.cross_entropy if self.default_loss else (loss_fn or _function(loss))
        metric = metric or (ACCURACY if self.default_loss else LOSS)
        self.metric_ref = metric
        self._metric: Fn | None = metric_fn
        if metric_fn is None and metric not in (ACCURACY, LOSS):
            self._metric = _function(metric)
        self.metric = _name(metric, self._metric)
        self.higher_is_better = _goal(goal, metric, self._metric)

    @property
    def goal(self) -> str:
        """max or min: which way the metric improves."""
        return "max" if self.higher_is_better else "min"

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss, a scalar tensor."""
        value = self._loss(out, y)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            what = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserCodeError(f"loss {self.loss_name} returned {what}; expected a scalar "
                                "tensor (the batch's mean loss)")
        return value.reshape(())

    def train_metrics(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """What the last stage reports of a training batch beside its loss: its accuracy,
        where the metric is accuracy (zdni.metrics records it as train_accuracy)."""
        if self.metric == ACCURACY and self._metric is None:
            return {"accuracy": accuracy_sum(out.detach(), y) / len(y)}
        return {}

    def score(self, out: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(loss sum, metric sum) of an evaluation batch: divided by the samples of all
        batches, they are the mean loss and metric. Cross-entropy keeps its per-sample sum
        over positions; a user's loss is its batch mean times the batch's samples."""
        y = y.to(out.device)
        n = len(y)
        if self.default_loss:
            loss_sum = F.cross_entropy(out, y, reduction="sum").item()
        else:
            loss_sum = float(self.loss(out, y)) * n
        if self.metric == ACCURACY and self._metric is None:
            metric_sum = accuracy_sum(out, y)
        elif self.metric_ref == LOSS:
            metric_sum = loss_sum
        else:
            assert self._metric is not None
            metric_sum = _number(self._metric(out, y), self.metric_ref) * n
        return loss_sum, metric_sum


def _function(ref: str) -> Fn:
    """The function a reference names; an nn.Module class is instantiated once."""
    if not is_reference(ref):
        raise UserCodeError(f"{ref!r} is neither a built-in ({CROSS_ENTROPY}, {ACCURACY}, "
                            f"{LOSS}) nor a reference: package.module:fn or file.py:fn")
    found = resolve(ref)
    if isinstance(found, type) and issubclass(found, nn.Module):
        try:
            return found()  # type: ignore[no-any-return]
        except Exception as exc:
            raise UserCodeError(f"{ref}: {found.__name__}() raised {type(exc).__name__}: "
                                f"{exc}") from None
    return found


def _name(metric: str, fn: Fn | None) -> str:
    """The metric's name in records (test_NAME, val_NAME): never 'loss' for a user's one."""
    if fn is None:
        return metric
    name = getattr(fn, "__name__", None) or type(fn).__name__
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name.lower())[:40]
    return f"metric_{name}" if name in (LOSS, "") else name


def _goal(goal: str, metric: str, fn: Fn | None) -> bool:
    """Whether higher is better."""
    if goal:
        if goal not in ("max", "min"):
            raise ConfigError(f"metric_goal must be max or min, got {goal!r}")
        return goal == "max"
    if fn is None:
        return metric == ACCURACY
    said = getattr(fn, "higher_is_better", None)
    if isinstance(said, bool):
        return said
    raise ConfigError(f"metric {metric}: say whether higher is better: --metric-goal max or "
                      f"min (or set {getattr(fn, '__name__', 'it')}.higher_is_better)")


def _number(value: Any, ref: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserCodeError(f"metric {ref} returned {value!r:.60}; expected a finite number "
                            "(the batch's mean)")
    return float(value)


@functools.lru_cache(maxsize=8)
def _cached(loss: str, metric: str, goal: str) -> Objective:
    return Objective(loss, metric, goal)


def objective_of(cfg: RunConfig) -> Objective:
    """The run's objective (built once per process and setting)."""
    return _cached(cfg.loss, cfg.metric, cfg.metric_goal)


def counts_samples(cfg: RunConfig) -> bool:
    """Whether the run's metric is accuracy, whose sum over a batch counts samples."""
    return cfg.metric == ACCURACY or (cfg.metric == "" and cfg.loss == CROSS_ENTROPY)


def conditioning_classes(cfg: RunConfig) -> int:
    """Per target value, the features cDNI appends: classes (one-hot) for class indices, 1 (the
    value itself) for float targets."""
    return cfg.classes if cfg.target_dtype == "int64" else 1


def check_targets(y: torch.Tensor | None, batch: int | None, cfg: RunConfig) -> torch.Tensor:
    """Targets as the run has them: int64 class indices within 0..classes-1, or float32 (finite:
    the codec refuses others), of shape (B, *cfg.label_shape); else MessageError."""
    shape = tuple(cfg.label_shape)
    if cfg.target_dtype == "int64":
        return check_labels(y, batch, cfg.classes, shape)
    return check_tensor("y", y, shape, torch.float32, batch)
