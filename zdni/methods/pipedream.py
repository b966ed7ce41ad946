"""Pipelined backprop with weight stashing (PipeDream: Narayanan et al., SOSP 2019, section 3.3).

Several batches are in flight, so a stage's weights change (by the updates of earlier batches'
gradients) between a batch's forward pass and its backward pass. Weight stashing keeps, for each
batch in flight, the version of the weights its forward used, and runs its backward through that
version: the gradient is the true gradient of the forward that was run, W - 1 updates stale
(W: the window, zdni/schedule.py), and is applied to the newest weights. The last stage runs
forward and backward at once, with no stash. With one batch in flight this is backprop, update
for update.

The forward runs the stage's module through torch.func.functional_call on a detached copy of
its parameters, so the kept graph references the copy, never the parameters the optimizer steps
in place. Forwards that no update separates share one copy (a version). BatchNorm's running
statistics are the module's own buffers, updated by each forward in the order of the forwards,
as in backprop; its backward uses the batch's own statistics, saved in the graph, so buffers need
no stash. Each input event reports the stash's size (stash_mb: the parameter copies held).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.func import functional_call

from zdni.methods.backprop import Backprop
from zdni.rng import UnitStreams
from zdni.stage import Outcome, Stage, StageError, Wiring

Params = dict[str, torch.Tensor]


class Stash:
    """The weight versions the batches in flight were forwarded with: a detached copy of the
    parameters per version still needed, shared by the batches that used it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.version = 0  # the live weights' version: one more with every update
        self.copies: dict[int, Params] = {}
        self.users: Counter[int] = Counter()

    def updated(self) -> None:
        """The live weights changed (an optimizer step)."""
        self.version += 1

    def hold(self) -> tuple[int, Params]:
        """The live weights' version for one more batch: (version, its copy)."""
        v = self.version
        if v not in self.copies:
            self.copies[v] = {name: p.detach().clone().requires_grad_(p.requires_grad)
                              for name, p in self.module.named_parameters()}
        self.users[v] += 1
        return v, self.copies[v]

    def release(self, version: int) -> Params:
        """A batch's backward is done with its version: the copy, dropped once unused."""
        params = self.copies[version]
        self.users[version] -= 1
        if self.users[version] <= 0:
            del self.copies[version], self.users[version]
        return params

    def megabytes(self) -> float:
        """The memory the copies hold, in MB (10^6 bytes)."""
        return sum(t.numel() * t.element_size() for copy in self.copies.values()
                   for t in copy.values()) / 1e6


class Forward(nn.Module):
    """A stage's module under its random streams (zdni/rng.py), as one module that
    functional_call can run on another set of parameters (named 'm.<name>')."""

    def __init__(self, module: nn.Module, streams: UnitStreams) -> None:
        super().__init__()
        self.m = module
        self.streams = streams

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.streams.forward(self.m, h)

    def run(self, params: Params, h: torch.Tensor) -> torch.Tensor:
        """The stage's forward pass on `h` with `params` in place of its parameters (its own
        buffers: BatchNorm's running statistics are updated as by a plain forward)."""
        out: torch.Tensor = functional_call(self, {f"m.{k}": v for k, v in params.items()}, (h,))
        return out


class PipeDream(Stage):
    name = "pipedream"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.stash = Stash(self.module)
        self.call = Forward(self.module, self.rng)
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # it: (h_in, out, v)

    @classmethod
    def wiring(cls, index: int, count: int) -> Wiring:
        """Backprop's: a stage updates when its output's gradient comes back (the last stage
        on its input)."""
        return Backprop.wiring(index, count)

    def train_input(self, it: int, h: torch.Tensor, y: torch.Tensor | None = None) -> Outcome:
        """Forward at the newest weights, whose version is stashed for this batch's backward
        (the last stage: forward, loss, backward and update at once, as backprop's)."""
        if self.last:
            return self._last(h, y)
        h_in = h.to(self.device, non_blocking=True).detach().requires_grad_(not self.first)
        version, params = self.stash.hold()
        out = self.call.run(params, h_in)
        self.kept[it] = (h_in, out, version)
        return Outcome(h_out=out.detach(), metrics={"stash_mb": self.stash.megabytes()})

    def _last(self, h: torch.Tensor, y: torch.Tensor | None) -> Outcome:
        """The last stage: forward, loss, backward and update at once (no stash)."""
        h_in = h.to(self.device, non_blocking=True).detach().requires_grad_(not self.first)
        self._zero()
        metrics = self._loss_backward(self._forward(h_in), self._to_device(y))
        self._step()
        return Outcome(d_in=None if self.first else h_in.grad, done=True, metrics=metrics)

    def train_grad(self, it: int, g: torch.Tensor) -> Outcome:
        """Backward through the kept graph at its stashed weights; that gradient updates the
        newest weights; the input's gradient goes back."""
        entry = self.kept.pop(it, None)
        if entry is None:
            raise StageError(f"stage {self.index}: gradient of iteration {it} has no forward")
        h_in, out, version = entry
        params = self.stash.release(version)
        return self._update(out, g, h_in, params)

    def _update(self, out: torch.Tensor, g: torch.Tensor, h_in: torch.Tensor,
                params: Params) -> Outcome:
        """Backpropagate g from `out` (a graph on `params`, copies or the live ones) into the
        parameters and h_in; step the live weights with those gradients."""
        names = [k for k, p in params.items() if p.requires_grad]
        wrt = [params[k] for k in names] + ([] if self.first else [h_in])
        grads = torch.autograd.grad(out, wrt, g.to(out.device, non_blocking=True),
                                    allow_unused=True)
        self._zero()
        live = dict(self.module.named_parameters())
        for name, grad in zip(names, grads):
            live[name].grad = grad
        self._step()
        self.stash.updated()
        return Outcome(d_in=None if self.first else grads[-1], done=True)


METHOD = PipeDream
