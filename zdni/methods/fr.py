"""Features Replay (FR: Huo, Gu and Huang, "Training neural networks using features replay",
NeurIPS 2018): delayed gradients (zdni/methods/ddg.py) without a stash. When the true gradient
of an earlier iteration comes back, the stage replays the forward of the input it kept at its
newest weights and backpropagates the delayed gradient through that replay (the authors' code,
slowbull/FeaturesReplay: `forward_backward` on the history input). A stage keeps inputs only;
the gradient is not the gradient of any forward that ran, but its error shrinks with the
learning rate, and FR's paper reports it converging and generalizing like backprop.
"""

from __future__ import annotations

from zdni.methods.ddg import DelayedGradients
from zdni.methods.pipedream import Params

NEWEST = -1  # the version a replay runs at: the newest weights, whatever they are then


class FeaturesReplay(DelayedGradients):
    name = "fr"

    def _weights_for_forward(self) -> tuple[int, Params]:
        return NEWEST, dict(self.module.named_parameters())

    def _weights_for_backward(self, version: int) -> Params:
        return dict(self.module.named_parameters())


METHOD = FeaturesReplay
