"""Fully decoupled DNI (Jaderberg et al. 2016, section 3.3): as update-decoupled, and every
stage but the first also keeps an input synthesizer I that predicts its input from the network's
input x. The driver sends each such stage its batch at once: it updates on I(x) (the batch
event), and when the true input arrives it trains I on it and forwards it only to produce the
true signals (the activation for the next stage, the gradient for the previous one)."""

from __future__ import annotations

import torch

from zdni.config import RunConfig
from zdni.methods.sg import SyntheticGradients
from zdni.stage import Outcome, StageError, Wiring


class FullyDecoupled(SyntheticGradients):
    name = "full"

    @classmethod
    def keeps_I(cls, cfg: RunConfig, index: int, count: int) -> bool:
        return index > 1

    @classmethod
    def labels_ride(cls, cfg: RunConfig) -> bool:
        """Every later stage needs x (and y) at once, before its activation: the driver sends
        them in its batch, and activations carry h alone."""
        return False

    @classmethod
    def wiring(cls, index: int, count: int) -> Wiring:
        return Wiring(batch_event=index > 1, grad_event=index < count, grad_from="input",
                      done_on="input")

    def train_batch(self, it: int, x: torch.Tensor, y: torch.Tensor | None) -> Outcome:
        """Update now from the synthetic input I(x); keep x (and y) for the
        true pass."""
        if not self.has_I:
            raise StageError(f"stage {self.index} has no input synthesizer (mode {self.name})")
        x = x.to(self.device, non_blocking=True)
        y = self._to_device(y)
        h_syn = self.synth.predict_input(it, x, y).to(self.device, non_blocking=True)
        self._zero()
        out = self._forward(h_syn)
        metrics = self._backward_output(it, out, y, remember=False)
        self._step()
        stored = {"x": x, "h_syn": h_syn}  # the ring keeps true and synthetic values
        if y is not None:
            stored["y"] = y
        self.rings["in"].put(it, stored)
        return Outcome(metrics={f"syn_{k}": v for k, v in metrics.items()})

    def train_input(self, it: int, h: torch.Tensor, y: torch.Tensor | None = None) -> Outcome:
        """Stage 1 as in sg; later stages train I on the true input, then forward it for the
        true signals without updating."""
        if not self.has_I:
            return super().train_input(it, h, y)
        h = h.to(self.device, non_blocking=True)
        slot = self.rings["in"].get(it)
        if slot is None:
            raise StageError(f"stage {self.index}: true input of iteration {it} came before its batch")
        x, y = slot["x"].to(self.device), slot.get("y")  # from Redis after a restart: on the CPU
        y = self._to_device(y)
        metrics = self.synth.train_input(it, x, y, h)
        h_in = h.detach().requires_grad_(True)
        self._zero()
        out = self._forward(h_in)
        metrics |= self._backward_output(it, out, y, remember=True)
        self._zero()  # the true pass only produces signals: its parameter gradients are dropped
        return Outcome(h_out=None if self.last else out.detach(), d_in=h_in.grad, done=True,
                       metrics=metrics)


METHOD = FullyDecoupled
