"""The global sample order of DESIGN.md, as a pure function of (manifest, seed, epoch).

Epoch ``e`` is a seeded permutation of all samples of the split. Global batch ``b`` is positions
``[b·G, (b+1)·G)`` of the concatenated epochs; rank ``r`` of ``W`` takes the contiguous slice
``[b·G + r·G/W, b·G + (r+1)·G/W)`` (:class:`slimpajama_train.data.loader.RankBatchSampler`). So the
loader state is one integer (samples consumed) and resuming, on any world size, is a seek.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z):
    """SplitMix64's finalizer: a bijective 64-bit mixer with full avalanche. Works on Python ints
    and, element-wise, on numpy uint64 arrays (whose products wrap mod 2**64, as the masks do here)."""
    z = z & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


@lru_cache(maxsize=64)
def _round_keys(seed: int, epoch: int, rounds: int) -> tuple[int, ...]:
    base = _mix64(_mix64(seed + _GOLDEN) ^ _mix64(epoch + 2 * _GOLDEN))
    return tuple(_mix64(base + (r + 1) * _GOLDEN) for r in range(rounds))


class GlobalSampleOrder:
    """Maps a global position (across epochs) to a (shard, index) pair of one split.

    Epoch ``e`` visits the ``total`` samples in a seeded pseudo-random order that is a pure function
    of (manifest, seed, epoch): the same on every rank and worker, for any world size.

    Memory is O(1) in the number of samples. A materialized permutation is one int64 per sample per
    epoch (2.4 GB for SlimPajama at seq 2048, ~300M samples), built again in every loader worker of
    every rank. Instead, ``sample_id`` evaluates a keyed bijection of [0, total) on demand: a Feistel
    network over the smallest power-of-two domain [0, 2**k) >= total, whose rounds alternate an
    unbalanced split of the k bits (so any k works), with round functions from a 64-bit mixer keyed
    by (seed, epoch, round). Values that land in [total, 2**k) are fed through again ("cycle
    walking"): each is a bijection of [0, 2**k), so following the cycle to the first value inside
    [0, total) is a bijection of [0, total). As 2**k < 2·total, that takes under 2 passes through
    the network on average. The remaining state is ``cum``, one int64 per shard (0.6 MB at 75k shards).
    """

    # Luby–Rackoff needs 4 rounds with random round functions; 6 for margin with unbalanced halves.
    # Halves of a few bits need more: with 6 rounds, the orders of 5 samples over many seeds are far
    # from uniform (a round function of a 1-bit half has only 4 choices); 24 makes them uniform, at
    # no cost that matters for a split of under 512 samples.
    ROUNDS = 6
    SMALL_DOMAIN_BITS, SMALL_DOMAIN_ROUNDS = 9, 24

    def __init__(self, shard_samples: list[int], seed: int, shuffle: bool = True) -> None:
        self.cum = np.concatenate([[0], np.cumsum(shard_samples, dtype=np.int64)]).astype(np.int64)
        self.total = int(self.cum[-1])
        if self.total == 0:
            raise ValueError("the split has no samples")
        self.seed = int(seed)
        self.shuffle = shuffle
        self._bits = (self.total - 1).bit_length()  # 2**bits >= total > 2**(bits-1)
        self._rounds = self.ROUNDS if self._bits > self.SMALL_DOMAIN_BITS else self.SMALL_DOMAIN_ROUNDS

    def _feistel(self, x, keys: tuple[int, ...]):
        """One pass of the network over [0, 2**bits); x: a Python int or a uint64 array."""
        a = self._bits // 2  # bits of the half the round function changes
        b = self._bits - a  # bits of the half it reads
        for key in keys:
            hi, lo = x >> b, x & ((1 << b) - 1)
            hi = hi ^ (_mix64(lo ^ key) & ((1 << a) - 1))
            x = (lo << a) | hi  # the halves swap, and so do their widths
            a, b = b, a
        return x

    def _permute(self, offset, epoch: int):
        keys = _round_keys(self.seed, epoch, self._rounds)
        x = self._feistel(offset, keys)
        while x >= self.total:  # cycle walking; expected < 2 passes (2**bits < 2·total)
            x = self._feistel(x, keys)
        return x

    def sample_id(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.total)
        return self._permute(offset, epoch) if self.shuffle else offset

    def sample_ids(self, positions: np.ndarray) -> np.ndarray:
        """Vectorized :meth:`sample_id` (int64 in, int64 out)."""
        epoch, offset = np.divmod(np.asarray(positions, dtype=np.int64), self.total)
        if not self.shuffle:
            return offset
        out = np.empty_like(offset)
        for e in np.unique(epoch):
            sel = epoch == e
            keys = _round_keys(self.seed, int(e), self._rounds)
            x = self._feistel(offset[sel].astype(np.uint64), keys)
            walk = np.flatnonzero(x >= self.total)
            while walk.size:
                x[walk] = self._feistel(x[walk], keys)
                walk = walk[x[walk] >= self.total]
            out[sel] = x.astype(np.int64)
        return out

    def locate(self, sample_id: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.cum, sample_id, side="right")) - 1
        return shard, sample_id - int(self.cum[shard])
