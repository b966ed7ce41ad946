"""The DNI paper's algorithmic sequence tasks, generated on the fly: Copy and Repeat Copy, with
the curriculum that lengthens them once the model solves the current length.

A batch is (x, y, mask), time-major: x (steps, batch, bits + 2), y (steps, batch, bits + 1),
mask (steps, batch), 1 where the output is scored. Copy shows `length` random bit vectors, then
a delimiter; the model must write the vectors back. Repeat Copy also shows the repeat count
(scaled to [0, 1] on the delimiter channel) and wants the vectors `repeats` times, then an end
marker on the extra output channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Curriculum", "copy_batch", "repeat_copy_batch", "bit_errors"]

SOLVED_BITS = 0.15  # the paper's criterion: under 0.15 wrong bits per sequence, on average


def copy_batch(batch: int, length: int, bits: int = 8,
               generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Copy batch: `length` vectors in, a delimiter, the same vectors out."""
    seq = torch.randint(0, 2, (length, batch, bits), generator=generator).float()
    steps = 2 * length + 1
    x = torch.zeros(steps, batch, bits + 2)
    x[:length, :, :bits] = seq
    x[length, :, bits] = 1.0  # the delimiter
    y = torch.zeros(steps, batch, bits + 1)
    y[length + 1:, :, :bits] = seq
    mask = torch.zeros(steps, batch)
    mask[length + 1:] = 1.0
    return x, y, mask


def repeat_copy_batch(batch: int, length: int, repeats: int, bits: int = 8,
                      max_repeats: int = 10, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Repeat Copy batch: `length` vectors and the repeat count in, the vectors `repeats`
    times and an end marker out."""
    seq = torch.randint(0, 2, (length, batch, bits), generator=generator).float()
    steps = length + 1 + repeats * length + 1
    x = torch.zeros(steps, batch, bits + 2)
    x[:length, :, :bits] = seq
    x[length, :, bits + 1] = repeats / max_repeats  # the count, on its own channel
    x[length, :, bits] = 1.0
    y = torch.zeros(steps, batch, bits + 1)
    start = length + 1
    for r in range(repeats):
        y[start + r * length: start + (r + 1) * length, :, :bits] = seq
    y[-1, :, bits] = 1.0  # the end marker
    mask = torch.zeros(steps, batch)
    mask[start:] = 1.0
    return x, y, mask


def bit_errors(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    """Wrong bits per sequence, averaged over the batch (outputs thresholded at 0.5)."""
    wrong = ((logits > 0).float() != y).float().sum(dim=2) * mask
    return float(wrong.sum() / y.shape[1])


@dataclass
class Curriculum:
    """The sequence length to train on: lengthened by one once the recent average error is
    under SOLVED_BITS (`window` batches), as the paper does."""

    length: int = 1
    window: int = 20
    best_solved: int = 0

    def __post_init__(self) -> None:
        self.recent: list[float] = []

    def observe(self, errors: float) -> bool:
        """Record a batch's bit errors; True when that solved the current length."""
        self.recent = [*self.recent[-(self.window - 1):], errors]
        if len(self.recent) == self.window and sum(self.recent) / self.window < SOLVED_BITS:
            self.best_solved = self.length
            self.length += 1
            self.recent = []
            return True
        return False
