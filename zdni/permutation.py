"""A seeded pseudo-random permutation of range(n) computed position by position, in O(1) memory.

Shuffling a data set of n samples usually materializes a permutation (torch.randperm, as
DataLoader's RandomSampler does): 8 bytes per sample, 80 MB for 10 million, more than the few
batches a streamed data set should hold. Here position i of epoch e's order is computed on its
own: a balanced Feistel network (Luby & Rackoff, "How to construct pseudorandom permutations
from pseudorandom functions", SIAM J. Comput. 1988) over the smallest domain of 2^(2k) >= n
values, with cycle walking to stay inside range(n) (Black & Rogaway, "Ciphers with Arbitrary
Finite Domains", CT-RSA 2002). The round function is SplitMix64's finalizer (Steele et al.,
OOPSLA 2014) of the half-block and a round key drawn from the seed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Permutation"]

ROUNDS = 6  # four rounds of a pseudorandom function make a strong PRP; two spare
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijective 64-bit mix (uint64 arithmetic wraps mod 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class Permutation:
    """A bijection of range(n) onto itself, the same for the same (n, key) in any process."""

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2  # each Feistel half holds this many bits
        self.mask = np.uint64((1 << self.half) - 1)
        seed = np.array([key & (2**64 - 1)], dtype=np.uint64)
        self.keys = [_mix(seed + np.uint64(r + 1))[0] for r in range(ROUNDS)]

    def _encrypt(self, v: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = v >> half, v & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The permuted values (int64) of positions in range(n)."""
        v = np.asarray(positions, dtype=np.uint64)
        if v.size and int(v.max()) >= self.n:
            raise IndexError(f"position {int(v.max())} is outside range({self.n})")
        out = self._encrypt(v)
        walk = out >= self.n
        while walk.any():  # cycle walking: the domain is < 4n, so few rounds are needed
            out[walk] = self._encrypt(out[walk])
            walk = out >= self.n
        return out.astype(np.int64)
