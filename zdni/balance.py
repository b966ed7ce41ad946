"""Cuts balanced by measurement (torchgpipe's balance_by_time): profile each unit, then a pure
function splits the costs so that the slowest stage is as fast as it can be.

A stage of units a..b-1 costs the sum of its units, plus, when it is not the last stage, what
its method adds at the boundary b (sg and full modes: M's forward and its training step; dgl: its
auxiliary head), plus, when it is not the first stage, what the method adds at boundary a (full
mode: its input synthesizer I). Each method names that work (zdni.stage.Stage.boundary_steps).
Profiling and splitting are separate: `split` is table-tested on costs the tests inject.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zdni import methods
from zdni.config import RunConfig
from zdni.failure import describe, one_line
from zdni.models import stage_shapes
from zdni.objective import conditioning_classes
from zdni.optim import build_optimizer
from zdni.optimspec import synth_spec
from zdni.usercode import UserCodeError

__all__ = ["Costs", "profile", "split", "stage_costs", "synthesizer_steps"]

Step = Callable[[], None]

WARMUP = 2  # untimed passes: allocator and kernel selection settle
REPEATS = 5  # timed passes; the median is kept


class Costs:
    """Measured costs in seconds: per unit, per boundary for M (index b: a stage ends before
    unit b), per boundary for I (index a: a stage starts at unit a)."""

    def __init__(self, units: Sequence[float], exit: Sequence[float] | None = None,
                 entry: Sequence[float] | None = None) -> None:
        self.units = list(units)
        n = len(self.units)
        self.exit = list(exit) if exit is not None else [0.0] * (n + 1)
        self.entry = list(entry) if entry is not None else [0.0] * (n + 1)

    def stage(self, a: int, b: int) -> float:
        """The cost of a stage of units a..b-1 in a model of len(units) units."""
        cost = sum(self.units[a:b])
        if b < len(self.units):
            cost += self.exit[b]
        if a > 0:
            cost += self.entry[a]
        return cost


def split(costs: Costs, stages: int) -> list[int]:
    """Cut points (the first unit of stages 2..S) minimizing the slowest stage (exact, by
    dynamic programming over contiguous partitions); ties go to the earliest cuts."""
    n = len(costs.units)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} units into {stages} stages")
    inf = float("inf")
    # best[k][j]: the least possible slowest-stage cost of units 0..j-1 in k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    back = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], costs.stage(i, j))
                if value < best[k][j]:
                    best[k][j], back[k][j] = value, i
    cuts, j = [], n
    for k in range(stages, 0, -1):
        j = back[k][j]
        cuts.append(j)
    return sorted(cuts)[1:]


def stage_costs(costs: Costs, cuts: Sequence[int]) -> list[float]:
    """Each stage's cost under the given cut points."""
    bounds = [0, *cuts, len(costs.units)]
    return [costs.stage(a, b) for a, b in zip(bounds, bounds[1:])]


def _median_time(step: object, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for r in range(WARMUP + REPEATS):
        sync()
        start = time.perf_counter()
        step()  # type: ignore[operator]
        sync()
        if r >= WARMUP:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def profile(cfg: RunConfig, units: list[nn.Module], input_shape: tuple[int, ...],
            device: str = "cpu") -> Costs:
    """Each unit's forward and backward time on a batch of cfg.batch_size, and at every
    boundary the work the run's method adds there (its `boundary_steps`: M and I in sg/full
    mode, an auxiliary head in dgl), on `device`."""
    method = methods.get(cfg.mode)
    dev = torch.device(device)
    shapes = stage_shapes([nn.Sequential(u) for u in units], input_shape)
    batch = cfg.batch_size
    unit_costs = []
    for k, (u, shape) in enumerate(zip(units, shapes)):
        u.to(dev).train()
        x = torch.randn(batch, *shape, device=dev, requires_grad=True)

        def step(u: nn.Module = u, x: torch.Tensor = x) -> None:
            out = u(x.clone())  # a stage's input is copied first (zdni/rng.py): in place is fine
            if out.requires_grad:
                out.backward(torch.ones_like(out))

        try:
            unit_costs.append(_median_time(step, dev))
        except Exception as exc:  # the user's unit: say which, in one line (zdni/failure.py)
            raise UserCodeError(f"--balance time: unit {k} ({describe(u)}) raised "
                                f"{one_line(exc)} when run forward and backward on {batch} "
                                f"random samples of shape {tuple(shape)}; fix the unit, or give "
                                f"--cuts or --balance params") from None
        u.zero_grad(set_to_none=True)
        u.cpu()
    n = len(units)
    exit_costs, entry_costs = [0.0] * (n + 1), [0.0] * (n + 1)
    for b in range(1, n):
        at_exit, at_entry = method.boundary_steps(cfg, shapes[0], shapes[b], dev)
        if at_exit is not None:
            exit_costs[b] = _median_time(at_exit, dev)
        if at_entry is not None:
            entry_costs[b] = _median_time(at_entry, dev)
    return Costs(unit_costs, exit_costs, entry_costs)


def synthesizer_steps(cfg: RunConfig, x_shape: tuple[int, ...], shape: tuple[int, ...],
                      device: str | torch.device, with_M: bool, with_I: bool
                      ) -> tuple[Step | None, Step | None]:
    """DNI's work at a cut (zdni.stage.Stage.boundary_steps): M's forward and its training
    step at the end of the stage before it, I's at the start of the stage after it."""
    from zdni.synthesizer import GradientSynthesizer, InputSynthesizer

    dev = torch.device(device)
    batch = cfg.batch_size
    y = torch.randint(0, cfg.classes, (batch, *cfg.label_shape), device=dev) \
        if cfg.target_dtype == "int64" else torch.randn(batch, *cfg.label_shape, device=dev)
    positions = math.prod(cfg.label_shape)
    label = y if cfg.conditioned else None
    m_step = i_step = None
    if with_M:
        m = GradientSynthesizer(shape, cfg.synth_hidden, cfg.synth_width,
                                cfg.conditioned, conditioning_classes(cfg), positions).to(dev)
        m_opt = build_optimizer(synth_spec(cfg), list(m.parameters()))
        h = torch.randn(batch, *shape, device=dev)

        def m_step() -> None:
            with torch.no_grad():
                m(h, label)
            m_opt.zero_grad(set_to_none=True)
            F.mse_loss(m(h, label), h.detach() * 0).backward()
            m_opt.step()

    if with_I:  # a later stage's input synthesizer
        i_net = InputSynthesizer(x_shape, shape, cfg.synth_hidden, cfg.synth_width,
                                 cfg.conditioned, conditioning_classes(cfg), positions).to(dev)
        i_opt = build_optimizer(synth_spec(cfg), list(i_net.parameters()))
        x0 = torch.randn(batch, *x_shape, device=dev)
        target = torch.zeros(batch, *shape, device=dev)

        def i_step() -> None:
            with torch.no_grad():
                i_net(x0, label)
            i_opt.zero_grad(set_to_none=True)
            F.mse_loss(i_net(x0, label), target).backward()
            i_opt.step()

    return m_step, i_step


def param_costs(units: list[nn.Module]) -> Costs:
    """Costs by parameter count (`--balance params`): no profiling, no synthesizer terms."""
    return Costs([float(sum(p.numel() for p in u.parameters())) for u in units])
