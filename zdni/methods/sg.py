"""Update-decoupled DNI (Jaderberg et al. 2016): a stage updates at once from its gradient
synthesizer M's prediction for its output, and trains M (L2) on the true gradient when it comes
back from the next stage (itself bootstrapped from that stage's M). --conditioned gives M the
one-hot label (cDNI)."""

from __future__ import annotations

import torch

from zdni.config import RunConfig
from zdni.stage import Outcome, Stage, StageError, Wiring


class SyntheticGradients(Stage):
    name = "sg"
    synthetic = True

    @classmethod
    def keeps_M(cls, cfg: RunConfig, index: int, count: int) -> bool:
        return index < count

    @classmethod
    def wiring(cls, index: int, count: int) -> Wiring:
        """Every stage updates on its input; the next stage's input event sends the gradient
        that trains this stage's M."""
        return Wiring(batch_event=False, grad_event=index < count, grad_from="input",
                      done_on="input")

    def train_input(self, it: int, h: torch.Tensor, y: torch.Tensor | None = None) -> Outcome:
        """Forward, backward from M's synthetic gradient (the loss on the last stage), update;
        send the activation on and the input's gradient back."""
        h = h.to(self.device, non_blocking=True)
        h_in = h.detach().requires_grad_(not self.first)
        self._zero()
        out = self._forward(h_in)
        metrics = self._backward_output(it, out, self._to_device(y), remember=True)
        self._step()
        return Outcome(h_out=None if self.last else out.detach(),
                       d_in=None if self.first else h_in.grad, done=True, metrics=metrics)

    def train_grad(self, it: int, g: torch.Tensor) -> Outcome:
        """M learns the true gradient of iteration `it`'s output."""
        if not self.has_M:
            raise StageError(f"stage {self.index} has no gradient synthesizer")
        g = g.to(self.device, non_blocking=True)
        return Outcome(metrics=self._trust(it, g, self.synth.train_grad(it, g)))


METHOD = SyntheticGradients
