"""Delayed gradients (DDG: Huo, Gu, Yang and Huang, "Decoupled parallel backpropagation with
convergence guarantee", ICML 2018, equations 8-10).

Stage k runs the forward of iteration t at once and, when the true gradient of its output for
an earlier iteration comes back (W - 1 iterations late here: zdni/schedule.py), updates with the
gradient "at the weights of the forward": the paper's delayed gradient is evaluated at
w^(t-K+k), the weights batch t-K+k was forwarded with, from the input the stage kept, and applied
to the newest weights. That is PipeDream's weight stashing (zdni/methods/pipedream.py), and the
two make the same updates here (a test holds them equal); they differ in what a stage keeps:
pipedream keeps each batch's forward graph (every activation inside the stage), ddg keeps the
batch's input and its weight version, and recomputes the forward when the gradient comes (one
more forward per batch, with the same dropout masks; BatchNorm's running statistics are
updated by the first forward only).

The authors' code (slowbull/DDG) keeps the forward's output graph instead; under the PyTorch of
2018 an optimizer step changed the weights inside that graph without complaint, so its backward
mixed the forward's activations with the newest weights. Today autograd refuses that graph, and
we follow the paper's equations.
"""

from __future__ import annotations

import torch

from zdni.methods.pipedream import Params, PipeDream
from zdni.stage import Outcome, StageError


class DelayedGradients(PipeDream):
    name = "ddg"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        # it: (the input, the random streams before its forward, the weight version or -1)
        self.inputs: dict[int, tuple[torch.Tensor, list[torch.Tensor], int]] = {}

    def _weights_for_forward(self) -> tuple[int, Params]:
        """The version a kept batch's backward will run at: the forward's (stashed)."""
        return self.stash.hold()

    def _weights_for_backward(self, version: int) -> Params:
        return self.stash.release(version)

    def train_input(self, it: int, h: torch.Tensor, y: torch.Tensor | None = None) -> Outcome:
        """Forward at the newest weights; keep the input, its random streams and its weights."""
        if self.last:
            return self._last(h, y)
        h_in = h.to(self.device, non_blocking=True).detach()
        version, params = self._weights_for_forward()
        streams = self.rng.peek()
        with torch.no_grad():
            out = self.call.run(params, h_in)
        self.inputs[it] = (h_in, streams, version)
        held = sum(t.numel() * t.element_size() for t, _, _ in self.inputs.values()) / 1e6
        return Outcome(h_out=out, metrics={"stash_mb": self.stash.megabytes() + held})

    def train_grad(self, it: int, g: torch.Tensor) -> Outcome:
        """Replay the kept input's forward at its weights, backpropagate the delayed gradient,
        update the newest weights; the input's gradient goes back."""
        entry = self.inputs.pop(it, None)
        if entry is None:
            raise StageError(f"stage {self.index}: gradient of iteration {it} has no forward")
        h, streams, version = entry
        params = self._weights_for_backward(version)
        h_in = h.requires_grad_(not self.first)
        now = self.rng.peek()
        self.rng.rewind(streams)  # the forward's own dropout masks
        buffers = {name: b.clone() for name, b in self.module.named_buffers()}
        try:  # the replay's running statistics go to copies: the forward counted this batch
            out = self.call.run({**params, **buffers}, h_in)
        finally:
            self.rng.rewind(now)
        return self._update(out, g, h_in, params)


METHOD = DelayedGradients
