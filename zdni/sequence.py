"""The DNI paper's sequence tasks: Copy and Repeat Copy generated on the fly, with the curriculum
that lengthens them once the model solves the current length; and character-level language
modelling on any text file (Corpus: a vocabulary from the file, a train/test split, bits per
character on the test part). Nothing is downloaded.

A batch is (x, y, mask), time-major: x (steps, batch, bits + 2), y (steps, batch, bits + 1),
mask (steps, batch), 1 where the output is scored. Copy shows `length` random bit vectors, then
a delimiter; the model must write the vectors back. Repeat Copy also shows the repeat count
(scaled to [0, 1] on the delimiter channel) and wants the vectors `repeats` times, then an end
marker on the extra output channel.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from zdni.data import DataError

__all__ = ["Corpus", "Curriculum", "bit_errors", "bits_per_char", "copy_batch", "copy_chunks",
           "repeat_copy_batch"]

SOLVED_BITS = 0.15  # the paper's criterion: under 0.15 wrong bits per sequence, on average
UNSCORED = 2  # a chunk label: no output is due at this step and bit


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


@dataclass
class Corpus:
    """A text file as character indices: `vocab` is its sorted set of characters, the last
    `test_fraction` of the text is the test part."""

    vocab: str
    train: torch.Tensor  # int64 character indices
    test: torch.Tensor

    @classmethod
    def from_file(cls, path: str | Path, test_fraction: float = 0.1,
                  max_vocab: int = 512) -> Corpus:
        """Read a UTF-8 text file; a file that is missing, not text, or too short to split is
        a DataError saying so."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"{path}: no such text file") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        vocab = "".join(sorted(set(text)))
        if len(vocab) > max_vocab:
            raise DataError(f"{path}: {len(vocab)} distinct characters, more than {max_vocab}: "
                            "is it text?")
        cut = int(len(text) * (1 - test_fraction))
        if cut < 1000 or len(text) - cut < 100:
            raise DataError(f"{path}: {len(text)} characters are too few for a language model "
                            "(1,000 to train on and 100 to test on, at least)")
        index = {ch: i for i, ch in enumerate(vocab)}
        ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
        return cls(vocab, ids[:cut], ids[cut:])

    @property
    def size(self) -> int:
        return len(self.vocab)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """One-hot inputs, float32, ids' shape + (vocab,)."""
        return torch.nn.functional.one_hot(ids, self.size).float()

    def windows(self, part: torch.Tensor, batch: int, length: int) -> int:
        """How many windows `streams` yields for the same arguments."""
        per = (len(part) - 1) // batch
        return max(0, (per - length) // length + 1)

    def streams(self, part: torch.Tensor, batch: int, length: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The text cut into `batch` contiguous streams, read `length` characters at a time:
        (x one-hot (length, batch, vocab), y next characters (length, batch), mask of ones).
        A model carries its state from one window to the next: the text goes on."""
        per = (len(part) - 1) // batch
        if per < length:
            raise DataError(f"{len(part)} characters cannot fill {batch} streams of {length}")
        cols = part[:per * batch + 1]
        x_all = cols[:-1][:per * batch].view(batch, per).t()
        y_all = cols[1:][:per * batch].view(batch, per).t()
        for a in range(0, per - length + 1, length):
            yield self.encode(x_all[a:a + length]), y_all[a:a + length], torch.ones(length, batch)


@torch.no_grad()
def bits_per_char(net: torch.nn.Module, corpus: Corpus, streams: int = 16,
                  length: int = 100) -> float:
    """The model's bits per character on the corpus's test part, read as `streams` contiguous
    streams with the state carried across windows (fewer and shorter for a short test part)."""
    n = len(corpus.test) - 1
    streams = max(1, min(streams, n // length))
    length = min(length, n // streams)
    state = net.zero_state(streams)  # type: ignore[operator]
    nats, count = 0.0, 0
    for x, y, _ in corpus.streams(corpus.test, streams, length):
        logits, state = net.chunk(x, state)  # type: ignore[operator]
        nats += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                                        reduction="sum"))
        count += y.numel()
    return nats / count / math.log(2)


def copy_chunks(sequences: int, batch: int, length: int, T: int, bits: int = 8,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy sequences as a pipeline's samples: one sample is one chunk of T steps of one
    sequence, and rows [i*batch, (i+1)*batch) are iteration i's batch, chunk after chunk of
    `sequences` batches of sequences (feed them in order).

    x: (rows, T, 1 + bits + 2): channel 0 flags the first chunk of a sequence (a recurrent layer
    resets its state there and passes the flag on), then Copy's inputs. y: (rows, T, bits)
    class labels: the bit due at that step, or UNSCORED where no output is due. The steps of a
    sequence (2 * length + 1) are padded with silent, unscored steps to a multiple of T."""
    gen = torch.Generator().manual_seed(seed)
    steps = 2 * length + 1
    chunks = -(-steps // T)
    xs, ys = [], []
    for _ in range(sequences):
        x, y, mask = copy_batch(batch, length, bits, gen)
        pad = chunks * T - steps
        x = torch.cat([torch.zeros(steps + pad, batch, 1),
                       torch.cat([x, torch.zeros(pad, batch, bits + 2)])], dim=2)
        x[0, :, 0] = 1.0
        labels = y[:, :, :bits].long()
        labels[mask == 0] = UNSCORED
        labels = torch.cat([labels, torch.full((pad, batch, bits), UNSCORED)])
        for k in range(chunks):  # (T, batch, ...) -> (batch, T, ...)
            xs.append(x[k * T:(k + 1) * T].transpose(0, 1))
            ys.append(labels[k * T:(k + 1) * T].transpose(0, 1))
    return torch.cat(xs).contiguous(), torch.cat(ys).contiguous()
