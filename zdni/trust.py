"""The trust gate: a stage that updates from synthetic gradients steps only as far as they have
earned, measured by how well M's past predictions agreed with the true gradients (issue 22).

With W batches in flight, M is trained on targets that are several iterations old, and a linear
M (Czarnecki et al. 2017: it can represent only a quadratic surrogate of the loss) then predicts
gradients that no longer fit the layer it drives. Adam is scale-invariant, so small, wrong
synthetic gradients still make full-size steps; across a cut that feeds a LayerNorm (blind to
part of any gradient) the stage drifts where nothing corrects M, M chases it, and the run
collapses (the MLP of issue 22: 95% at one batch in flight, 28% at four). The gate scales the
stage's learning rate, for that update only, by

    scale = clamp(running_cosine / full, 0, 1)

where running_cosine is an exponential moving average (`decay`) of the cosine similarity between
the synthetic gradient the stage used and the true gradient that came back for the same
iteration (zdni.synthesizer.agreement, grad_cos). Until the first true gradient comes back the
scale is 0: M starts at zero and has nothing to say. It measures nothing new (grad_cos is
already each stage's metric); it is a controller on it, chosen by measurement in
docs/RESULTS.md (scripts/stale_dni.py --gate cos is the same rule in plain PyTorch).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["TrustGate"]


class TrustGate:
    """Scale of a stage's next update from the agreement of its synthetic gradients.

    full: the running cosine at and above which the stage takes full steps (0 < full <= 1).
    decay: the moving average's weight on its past, 0 <= decay < 1.
    """

    def __init__(self, full: float = 1.0, decay: float = 0.9) -> None:
        if not 0 < full <= 1:
            raise ValueError(f"trust gate: full must be in (0, 1], not {full}")
        if not 0 <= decay < 1:
            raise ValueError(f"trust gate: decay must be in [0, 1), not {decay}")
        self.full = full
        self.decay = decay
        self.running: float | None = None  # the moving average of grad_cos; None: none yet

    def observe(self, cosine: float) -> None:
        """One agreement measured (grad_cos of an iteration whose true gradient came back).
        A non-finite cosine is skipped (a zero gradient on either side has no direction)."""
        if not math.isfinite(cosine):
            return
        if self.running is None:
            self.running = cosine
        else:
            self.running = self.decay * self.running + (1 - self.decay) * cosine

    @property
    def scale(self) -> float:
        """The factor of the next update's learning rate, in [0, 1]."""
        if self.running is None:
            return 0.0
        return min(1.0, max(0.0, self.running / self.full))

    def state_dict(self) -> dict[str, Any]:
        """What a backup keeps (plain numbers)."""
        return {"running": self.running}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        running = state.get("running")
        self.running = None if running is None else float(running)
