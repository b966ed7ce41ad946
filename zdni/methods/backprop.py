"""Backprop: the baseline. A stage keeps its forward graph until the true gradient of its output
comes back, then updates (update-locked: one batch in flight, since a later batch's update would
change the weights a kept graph was built with; PipeDream's weight stashing lifts that)."""

from __future__ import annotations

import torch

from zdni.stage import Outcome, Stage, StageError, Wiring


class Backprop(Stage):
    name = "backprop"
    window = 1

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # kept graphs

    @classmethod
    def wiring(cls, index: int, count: int) -> Wiring:
        """A gradient comes back to every stage but the last, sent on by the next stage's own
        gradient event (the last stage's input event); each updates on it."""
        last = index == count
        return Wiring(batch_event=False, grad_event=not last,
                      grad_from="grad" if index + 1 < count else "input",
                      done_on="input" if last else "grad")

    def train_input(self, it: int, h: torch.Tensor, y: torch.Tensor | None = None) -> Outcome:
        h = h.to(self.device, non_blocking=True)
        h_in = h.detach().requires_grad_(not self.first)
        self._zero()
        out = self._forward(h_in)
        if not self.last:
            self.pending[it] = (h_in, out)
            return Outcome(h_out=out.detach())
        metrics = self._loss_backward(out, self._to_device(y))
        self._step()
        return Outcome(d_in=None if self.first else h_in.grad, done=True, metrics=metrics)

    def train_grad(self, it: int, g: torch.Tensor) -> Outcome:
        entry = self.pending.pop(it, None)
        if entry is None:
            raise StageError(f"stage {self.index}: gradient of iteration {it} has no forward")
        h_in, out = entry
        self._zero()
        out.backward(g.to(self.device, non_blocking=True))
        self._step()
        return Outcome(d_in=None if self.first else h_in.grad, done=True)


METHOD = Backprop
