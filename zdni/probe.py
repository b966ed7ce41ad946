"""Before any process starts, every stage of the run trains once on a real batch, as it will.

Each stage runs forward *and* backward on its real input kind: stage 1 on a batch of the data,
every later stage on a leaf that needs a gradient (what a worker receives), in train mode, at
the run's batch size and at the epoch's last, smaller batch size; the last stage's loss is the
run's loss on the batch's labels. The stages are zdni.models.cut of a copy of the units, run
through zdni.rng.UnitStreams as zdni.stage runs them, so a unit raising, a value that is not
finite, or an input that gets no gradient is found here, in seconds, and said in one line
(zdni.failure.StageFailure, a ZdniError), instead of at the first iteration of every worker.

A model that trains at the run's batch size but not on the epoch's last batch (BatchNorm cannot
train on one sample) gets that batch left out of every epoch (cfg.drop_last), said once.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zdni import failure
from zdni.config import RunConfig
from zdni.failure import StageFailure
from zdni.models import cut
from zdni.objective import Objective, objective_of
from zdni.rng import UnitStreams, span
from zdni.usercode import UserCodeError

__all__ = ["probe", "unit_shapes", "wants"]

log = logging.getLogger("zdni.driver")


def probe(cfg: RunConfig, units: Sequence[nn.Module], points: Sequence[int],
          x: torch.Tensor, y: torch.Tensor, total: int | None = None,
          objective: Objective | None = None) -> None:
    """Train each stage of the cut at `points` once (forward and backward, nothing stepped) on
    the first samples of (x, y), at the run's batch size, then at the epoch's last batch size
    (`total` training samples: len(x) by default), with the run's loss (`objective`).
    Raises StageFailure naming the stage, the unit and what to do; sets cfg.drop_last when
    only the last, smaller batch cannot be trained on."""
    total = len(x) if total is None else total
    loss = (objective or objective_of(cfg)).loss
    full = min(cfg.batch_size, len(x))
    last = total % cfg.batch_size if total > cfg.batch_size else 0
    state = torch.random.get_rng_state()
    try:
        run_once(cfg, units, points, x[:full], y[:full], loss)
        if last and not cfg.drop_last:
            try:
                run_once(cfg, units, points, x[:last], y[:last], loss)
            except StageFailure as exc:
                cfg.drop_last = True
                cause = str(exc).split("; retrying")[0]  # the cause, not the advice
                log.warning("[driver] each epoch's last batch holds %d sample%s, which the "
                            "model cannot train on (%s): it is left out of every epoch, as "
                            "--drop-last does", last, "" if last == 1 else "s", cause)
    finally:
        torch.random.set_rng_state(state)


def run_once(cfg: RunConfig, units: Sequence[nn.Module], points: Sequence[int],
             x: torch.Tensor, y: torch.Tensor,
             loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
             ) -> None:
    """One forward and backward of every stage on (x, y) with the loss `loss_of`, on a copy
    of the units."""
    stages = cut(copy.deepcopy(list(units)), points)
    n = len(x)
    h = x
    passes: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i, module in enumerate(stages, start=1):
        module.train()
        h_in = h.detach().requires_grad_(i > 1)
        with failure.guard(i, span(module), n, "plan"):
            out = UnitStreams(cfg.seed, module).forward(module, h_in)
        if not isinstance(out, torch.Tensor):
            raise StageFailure(f"stage {i} returns a {type(out).__name__}, not a tensor: a "
                               f"stage passes one tensor on (return a tensor from unit "
                               f"{span(module)[1] - 1})")
        passes.append((h_in, out))
        h = out
    count = len(stages)
    g: torch.Tensor | None = None
    for i in range(count, 0, -1):
        module, (h_in, out) = stages[i - 1], passes[i - 1]
        units_of = span(module)
        with failure.guard(i, units_of, n, "plan"):
            if i == count:
                loss = loss_of(out, y)
                failure.check(i, units_of, n, "plan", None, None, {"loss": loss.item()})
                loss.backward()
            else:
                assert g is not None
                out.backward(g)
        if i == 1:
            break
        if h_in.grad is None:
            raise StageFailure(f"stage {i}'s output does not depend on its input (unit "
                               f"{units_of[0]}): no gradient reaches stages 1..{i - 1}; a "
                               f"unit must use what it is given")
        failure.check(i, units_of, n, "plan", None, h_in.grad, {})
        g = h_in.grad


def unit_shapes(model: str, units: Sequence[nn.Module], shape: tuple[int, ...],
                data_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-sample shapes before every unit and after the last: [shape, after unit 0, ...] (a
    shape probe in eval mode, nothing learned). A unit that raises is a UserCodeError saying
    what zdni fed it and what its first layer wants and how to give it that."""
    h = torch.zeros(2, *shape)
    shapes = [tuple(shape)]
    for k, unit in enumerate(units):
        was = unit.training
        unit.eval()  # a shape probe must not move BatchNorm's running statistics
        try:
            with torch.no_grad():
                h = unit(h)
        except Exception as exc:
            fed = f"samples of shape {tuple(shape)} (the data is {data_shape[0]} x " \
                  f"{' x '.join(map(str, data_shape[1:]))})" if k == 0 else \
                f"what unit {k - 1} outputs, samples of shape {tuple(h.shape[1:])}"
            want = wants(unit, tuple(h.shape[1:]))
            raise UserCodeError(f"model {model}: unit {k} ({failure.describe(unit)}) cannot "
                                f"take {fed}{'; ' + want if want else ''} "
                                f"[{failure.one_line(exc)[:160]}]") from None
        finally:
            unit.train(was)
        if not isinstance(h, torch.Tensor):
            raise UserCodeError(f"model {model}: unit {k} ({failure.describe(unit)}) returns a "
                                f"{type(h).__name__}; each unit must return one tensor")
        shapes.append(tuple(h.shape[1:]))
    return shapes


def wants(unit: nn.Module, fed: tuple[int, ...]) -> str | None:
    """What the first layer of `unit` takes per sample, said against what it was fed, with the
    usual fix (a channel axis for images stored N x H x W, a Flatten for a Linear on images)."""
    first = next((m for m in unit.modules() if isinstance(m, _LAYERS)), None)
    if first is None:
        return None
    if isinstance(first, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(first)]
        space = ("L",) if dims == 1 else ("H", "W") if dims == 2 else ("D", "H", "W")
        need = f"({first.in_channels}, {', '.join(space)})"
        text = f"its first layer, {first}, wants samples of shape {need}"
        if len(fed) == dims and first.in_channels == 1:
            text += f": add a channel axis to the data (x[:, None], N x 1 x " \
                    f"{' x '.join(map(str, fed))})"
        elif len(fed) == dims + 1 and fed[-1] == first.in_channels and fed[0] != fed[-1]:
            text += ": the data is channels-last; store it channels-first (x.transpose)"
        return text
    if isinstance(first, nn.Linear):
        text = f"its first layer, {first}, wants samples of {first.in_features} features"
        if len(fed) > 1 and _prod(fed) == first.in_features:
            text += ": flatten the samples first (put nn.Flatten() before it)"
        return text
    if isinstance(first, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
        return f"its first layer, {first}, wants {first.num_features} channels or features"
    if isinstance(first, nn.RNNBase):
        return f"its first layer, {first}, wants (T, {first.input_size}) sequences"
    return None


_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
           nn.BatchNorm3d, nn.RNNBase)


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out
