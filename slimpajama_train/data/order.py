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


class KeyedBijection:
    """A seeded bijection of [0, size): a Feistel network over the smallest power-of-two domain
    [0, 2**k) >= size, whose rounds alternate an unbalanced split of the k bits (so any k works), with
    round functions from a 64-bit mixer keyed by (seed, epoch, round). Values that land in
    [size, 2**k) are fed through again ("cycle walking"): each pass is a bijection of [0, 2**k), so
    following the cycle to the first value inside [0, size) is a bijection of [0, size). As
    2**k < 2·size, that takes under 2 passes through the network on average. O(1) memory."""

    # Luby–Rackoff needs 4 rounds with random round functions; 6 for margin with unbalanced halves.
    # Halves of a few bits need more: with 6 rounds, the orders of 5 samples over many seeds are far
    # from uniform (a round function of a 1-bit half has only 4 choices); 24 makes them uniform, at
    # no cost that matters for a domain of under 512 values.
    ROUNDS = 6
    SMALL_DOMAIN_BITS, SMALL_DOMAIN_ROUNDS = 9, 24

    def __init__(self, size: int, seed: int, epoch: int) -> None:
        self.size = int(size)
        self.bits = (self.size - 1).bit_length()  # 2**bits >= size > 2**(bits-1)
        rounds = self.ROUNDS if self.bits > self.SMALL_DOMAIN_BITS else self.SMALL_DOMAIN_ROUNDS
        self.keys = _round_keys(int(seed), int(epoch), rounds)

    def _feistel(self, x):
        """One pass of the network over [0, 2**bits); x: a Python int or a uint64 array."""
        a = self.bits // 2  # bits of the half the round function changes
        b = self.bits - a  # bits of the half it reads
        for key in self.keys:
            hi, lo = x >> b, x & ((1 << b) - 1)
            hi = hi ^ (_mix64(lo ^ key) & ((1 << a) - 1))
            x = (lo << a) | hi  # the halves swap, and so do their widths
            a, b = b, a
        return x

    def __call__(self, x: int) -> int:
        x = self._feistel(x)
        while x >= self.size:  # cycle walking; expected < 2 passes (2**bits < 2·size)
            x = self._feistel(x)
        return x

    def many(self, x: np.ndarray) -> np.ndarray:
        """Vectorized: int64 values of [0, size) in, their images out."""
        y = self._feistel(np.asarray(x).astype(np.uint64))
        walk = np.flatnonzero(y >= self.size)
        while walk.size:
            y[walk] = self._feistel(y[walk])
            walk = walk[y[walk] >= self.size]
        return y.astype(np.int64)


class GlobalSampleOrder:
    """Maps a global position (across epochs) to a (shard, index) pair of one split.

    Epoch ``e`` visits the ``total`` samples in a seeded pseudo-random order that is a pure function
    of (manifest, seed, epoch): the same on every rank and worker, for any world size.

    Memory is O(1) in the number of samples. A materialized permutation is one int64 per sample per
    epoch (2.4 GB for SlimPajama at seq 2048, ~300M samples), built again in every loader worker of
    every rank. Instead, ``sample_id`` evaluates a :class:`KeyedBijection` of [0, total) keyed by
    (seed, epoch) on demand. The remaining state is ``cum``, one int64 per shard (0.6 MB at 75k shards).
    """

    def __init__(self, shard_samples: list[int], seed: int, shuffle: bool = True) -> None:
        self.cum = np.concatenate([[0], np.cumsum(shard_samples, dtype=np.int64)]).astype(np.int64)
        self.total = int(self.cum[-1])
        if self.total == 0:
            raise ValueError("the split has no samples")
        self.seed = int(seed)
        self.shuffle = shuffle

    def sample_id(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.total)
        return KeyedBijection(self.total, self.seed, epoch)(offset) if self.shuffle else offset

    def sample_ids(self, positions: np.ndarray) -> np.ndarray:
        """Vectorized :meth:`sample_id` (int64 in, int64 out)."""
        epoch, offset = np.divmod(np.asarray(positions, dtype=np.int64), self.total)
        if not self.shuffle:
            return offset
        out = np.empty_like(offset)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = KeyedBijection(self.total, self.seed, int(e)).many(offset[sel])
        return out

    def locate(self, sample_id: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.cum, sample_id, side="right")) - 1
        return shard, sample_id - int(self.cum[shard])


# Salts that give the shard permutation and each block's shuffle keys of their own, apart from the
# global order's (seed, epoch) keys.
_SHARDS_SALT, _BLOCK_SALT = 0x5B4A9D3C2E1F0A17, 0x2D6C8E4A1B3F5978


class BlockShuffledOrder(GlobalSampleOrder):
    """``data.order=blocks``: the shards are permuted per (seed, epoch), cut into blocks of ``K``
    consecutive shards of that permutation, and the samples of each block are shuffled among
    themselves; an epoch reads the blocks one after the other. A loader then reads K shards at a
    time (one at a time, whole, from object storage: a node fetches each shard once per epoch) where
    the global order touches any shard at any time. The order is a pure function of (manifest, seed,
    epoch, K), like the global one, so resuming at any sample on any world size is the same seek.

    Memory: the permutation of one epoch and its sample prefix sums, two int64 per shard (1.2 MB at
    75k shards), computed for the epoch in use (each loader process keeps one); nothing per sample.
    The shuffle within a block is a :class:`KeyedBijection` of its samples. Sample ids, ``cum`` and
    :meth:`locate` are the global order's."""

    def __init__(self, shard_samples: list[int], seed: int, block_shards: int, shuffle: bool = True) -> None:
        if block_shards < 1:
            raise ValueError(f"data.block_shards={block_shards}: must be >= 1")
        super().__init__(shard_samples, seed, shuffle)
        self.samples = np.diff(self.cum)
        self.block_shards = int(block_shards)
        self._layout: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shards in the epoch's order, the sample offset where each starts in it (and the total),
        the offset where each block starts (and the total))."""
        if self._layout is None or self._layout[0] != epoch:
            n = len(self.samples)
            shards = (KeyedBijection(n, _mix64(self.seed ^ _SHARDS_SALT), epoch).many(np.arange(n))
                      if self.shuffle else np.arange(n))
            starts = np.concatenate([[0], np.cumsum(self.samples[shards])]).astype(np.int64)
            blocks = np.append(starts[:-1:self.block_shards], self.total)
            self._layout = (epoch, shards, starts, blocks)
        return self._layout[1:]

    def block_shards_of(self, epoch: int, block: int) -> np.ndarray:
        """The shards of block ``block`` of epoch ``epoch`` (what a cache prefetches before the block)."""
        shards, _, _ = self.epoch_layout(epoch)
        return shards[block * self.block_shards:(block + 1) * self.block_shards]

    def sample_ids(self, positions: np.ndarray) -> np.ndarray:
        """The sample id (as :class:`GlobalSampleOrder` numbers them: shard by shard) at each position."""
        epoch, offset = np.divmod(np.asarray(positions, dtype=np.int64), self.total)
        out = np.empty_like(offset)
        for e in np.unique(epoch):
            in_epoch = np.flatnonzero(epoch == e)
            shards, starts, blocks = self.epoch_layout(int(e))
            block = np.searchsorted(blocks, offset[in_epoch], side="right") - 1
            flat = offset[in_epoch].copy()  # the offset in the epoch's concatenated shards
            if self.shuffle:
                for b in np.unique(block):
                    sel = block == b
                    lo, hi = int(blocks[b]), int(blocks[b + 1])
                    flat[sel] = lo + KeyedBijection(hi - lo, self._block_key(int(b)), int(e)).many(flat[sel] - lo)
            at = np.searchsorted(starts, flat, side="right") - 1  # skips shards without samples
            out[in_epoch] = self.cum[shards[at]] + (flat - starts[at])
        return out

    def _block_key(self, block: int) -> int:
        return _mix64(_mix64(self.seed ^ _BLOCK_SALT) + block)

    def sample_id(self, position: int) -> int:
        """:meth:`sample_ids` of one position, on Python ints (what a loader's ``__getitem__`` asks)."""
        epoch, offset = divmod(int(position), self.total)
        shards, starts, blocks = self.epoch_layout(epoch)
        flat = offset
        if self.shuffle:
            b = int(np.searchsorted(blocks, offset, side="right")) - 1
            lo, hi = int(blocks[b]), int(blocks[b + 1])
            flat = lo + KeyedBijection(hi - lo, self._block_key(b), epoch)(offset - lo)
        at = int(np.searchsorted(starts, flat, side="right")) - 1
        return int(self.cum[shards[at]]) + flat - int(starts[at])


ORDERS = ("global", "blocks")


def sample_order(name: str, shard_samples: list[int], seed: int, block_shards: int,
                 shuffle: bool = True) -> GlobalSampleOrder:
    """The order ``data.order`` names (``block_shards`` is read by ``blocks`` only)."""
    if name not in ORDERS:
        raise ValueError(f"data.order={name!r}: must be one of {', '.join(ORDERS)}")
    if name == "blocks":
        return BlockShuffledOrder(shard_samples, seed, block_shards, shuffle)
    return GlobalSampleOrder(shard_samples, seed, shuffle)
