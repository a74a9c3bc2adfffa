"""Shard loading in the global sample order of DESIGN.md.

The order is a pure function of (manifest, seed, epoch): epoch ``e`` is a seeded permutation of all
samples of the split. Global batch ``b`` is positions ``[b·G, (b+1)·G)`` of the concatenated epochs;
rank ``r`` of ``W`` takes the contiguous slice ``[b·G + r·G/W, b·G + (r+1)·G/W)``. So the loader
state is one integer (samples consumed) and resuming, on any world size, is a seek.

Batches leave the loader as they are stored: one (B, T+1) tensor of the shard's token dtype per
micro-batch (uint16 for vocabularies of up to 2**16 ids, int32 for uint32 shards), pinned when
training on CUDA. :func:`to_device_batch` moves it in one non-blocking copy and widens it to int64
on the device: a quarter of the int64 bytes (uint16) through the workers' shared memory, the pinning
thread and PCIe, and one copy where inputs and targets took two.
"""
from __future__ import annotations

import atexit
import os
import signal
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_prep.shard_format import MANIFEST, RecordLayout, ShardReader, load_manifest


@dataclass
class DataConfig:
    """Where the shards are and how they are read.

    Attributes:
        path: directory with ``manifest.json`` and the shards (output of ``slimpajama-prep``).
        seed: seeds the per-epoch permutation of samples.
        micro_batch_size: samples per rank per forward/backward.
        num_workers: DataLoader worker processes per rank.
        tokenizer_sha256: when set, the manifest's tokenizer must have this checksum.
        max_open_shards: shard files each loader process keeps open (an LRU); with a global random
            order every read may hit another shard, so this bounds file descriptors per worker.
        allow_change: resume onto data whose manifest (``prep_config_hash``) differs from the one the
            checkpoint was trained on (a warning instead of an error).
    """

    path: str = "data/demo_shards"
    seed: int = 1234
    micro_batch_size: int = 8
    num_workers: int = 1
    tokenizer_sha256: str | None = None
    max_open_shards: int = 16
    allow_change: bool = False

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"data.micro_batch_size={self.micro_batch_size}: must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers}: must be >= 0")
        if self.max_open_shards < 1:
            raise ValueError(f"data.max_open_shards={self.max_open_shards}: must be >= 1")


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


class TokenBlocks(Dataset):
    """Map-style dataset: item ``position`` is the sample at that position of the global order.

    Per shard it keeps only metadata in arrays (name, size in bytes, sample offset: 32 bytes with
    prep's ``train-000000.tar`` names, 2.4 MB at 75k shards) and opens shards lazily, keeping at
    most ``max_open_shards`` open in an LRU per process (each DataLoader worker has its own). Nothing is
    opened or stat-ed at construction: a missing or truncated shard fails when first read, naming
    ``manifest.json`` and the shard.

    Checks, priced for 75k shards and every sample read:

    - Shard names must stay inside ``data_dir`` (no absolute path, no ``..``), checked when the
      manifest is read with string tests per name, no filesystem call. See :func:`check_shard_names`.
    - Every sample's token ids must be below the manifest's ``tokenizer.vocab_size``, checked on each
      read, before the sample reaches a batch: a max over the block just read (~1-3 µs per sample;
      DESIGN.md). An id past the vocabulary would index past the embedding table (an ``IndexError``
      on CPU, a device-side assert on a GPU), and an id between the tokenizer's and the model's
      vocabulary would be trained on silently.
    """

    def __init__(self, data_dir: Path, manifest: dict[str, Any], split: str, seed: int, shuffle: bool,
                 max_open_shards: int = 16, with_source: bool = False) -> None:
        entry = manifest["splits"].get(split)
        if not entry or not entry["shards"]:
            raise ValueError(f"{data_dir}: manifest has no {split!r} shards")
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards={max_open_shards}: must be >= 1")
        shards = entry["shards"]
        self.data_dir = Path(data_dir)
        self.manifest_path = self.data_dir / MANIFEST
        self.dtype = np.dtype(manifest["dtype"])
        # What items hold: the stored dtype, except uint32 as int32 (the same bytes; token ids are
        # < 2**31): torch's uint32 is a "barebones" dtype with few ops, where int32 has them all.
        # uint16 is one too, but stack, pinning, copies and ``.long()`` (CPU and CUDA) take it.
        self.item_dtype = np.dtype(np.int32) if self.dtype == np.uint32 else self.dtype
        vocab = manifest.get("tokenizer", {}).get("vocab_size", 0)
        if self.dtype == np.uint32 and vocab > 2**31:
            raise ValueError(f"{self.manifest_path}: a vocabulary of {vocab} ids does not fit int32 batches")
        self.layout = RecordLayout(**manifest["record"])
        self.block_size = int(manifest["block_size"])
        self.max_open_shards = max_open_shards
        self.order = GlobalSampleOrder([s["samples"] for s in shards], seed, shuffle)
        # Ids at or past the tokenizer's vocabulary are refused on read (0: no vocabulary recorded).
        self.vocab_size = int(vocab)
        check_shard_names(self.data_dir, [s["name"] for s in shards], self.manifest_path)
        # No manifest dicts, Path or reader objects per shard: fixed-width name bytes and sizes.
        self.shard_names = np.array([s["name"].encode() for s in shards], dtype=np.bytes_)
        self.shard_bytes = np.array([s["bytes"] for s in shards], dtype=np.int64)
        # With ``with_source`` an item is (tokens, source index): the source of a shard that holds one
        # source (prep writes validation shards that way), -1 for a mixed shard.
        self.with_source = with_source
        self.sources, self.shard_source = shard_sources(shards)
        self._open: OrderedDict[int, Any] = OrderedDict()  # shard -> open reader, least recent first
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.order.total

    def open_shard(self, shard: int) -> ShardReader:
        """An open reader of ``shard`` (anything with ``read(index)`` and ``close()``); raises if the
        shard is missing or its size differs from the manifest's. Tests override it."""
        name = self.shard_names[shard].decode()
        return ShardReader(self.data_dir / name, shard, self.block_size, self.dtype, self.layout,
                           expected_bytes=int(self.shard_bytes[shard]), manifest_path=self.manifest_path).open()

    def _reader(self, shard: int) -> Any:
        if self._pid != os.getpid():
            # A forked worker inherited the parent's descriptors: close its copies (the parent's stay
            # open) so that each process holds at most max_open_shards.
            for r in self._open.values():
                r.close()
            self._open = OrderedDict()
            self._pid = os.getpid()
        r = self._open.get(shard)
        if r is not None:
            self._open.move_to_end(shard)
            return r
        while len(self._open) >= self.max_open_shards:
            self._open.popitem(last=False)[1].close()
        r = self._open[shard] = self.open_shard(shard)
        return r

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __getitem__(self, position: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        shard, index = self.order.locate(self.order.sample_id(position))
        # A copy (the reader's array is a read-only view of the record) in the stored dtype.
        block = np.array(self._reader(shard).read(index), dtype=self.dtype)
        if self.vocab_size and (top := int(block.max())) >= self.vocab_size:
            self._refuse_ids(shard, index, block, top)
        tokens = torch.from_numpy(block.view(self.item_dtype))
        return (tokens, int(self.shard_source[shard])) if self.with_source else tokens

    def _refuse_ids(self, shard: int, index: int, block: np.ndarray, top: int) -> None:
        name = self.shard_names[shard].decode()
        where = int(np.argmax(block >= self.vocab_size))
        raise ValueError(f"{self.data_dir / name}: sample {index} holds token id {top} (at position {where}), but "
                         f"{self.manifest_path} says the tokenizer has {self.vocab_size} ids; the shard was not "
                         "written with this manifest's tokenizer: re-run prep for it (or restore the right shards)")

    def __getstate__(self) -> dict:
        # Open files do not cross process boundaries (spawned workers open their own).
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_pid"] = None
        return state


def check_shard_names(data_dir: Path, names: list[str], manifest_path: Path) -> None:
    """Refuse a shard name that would read a file outside ``data_dir``: an absolute path or a ``..``
    component (prep writes plain file names). The name alone is checked, with string tests (~0.5 µs
    per name, ~40 ms at 75k shards) and no filesystem call; a symlink the user placed in the data
    folder (shards linked in from a shared store) is the user's layout and is followed."""
    for name in names:
        parts = name.split("/")
        if not name or name.startswith(("/", "\\")) or ".." in parts or "\\" in name or name.endswith("/"):
            raise ValueError(f"{manifest_path}: shard name {name!r} points outside {data_dir}; a shard name must be "
                             "a file name inside the data folder (as slimpajama-prep writes them)")


def shard_sources(shards: list[dict[str, Any]]) -> tuple[list[str], np.ndarray]:
    """The sources that have a shard of their own (sorted), and per shard the index of its one
    source in that list, or -1 where a shard mixes sources."""
    single = [next(iter(s["tokens_per_source"])) if len(s.get("tokens_per_source", {})) == 1 else None
              for s in shards]
    names = sorted({x for x in single if x is not None})
    index = {x: k for k, x in enumerate(names)}
    return names, np.array([index[x] if x is not None else -1 for x in single], dtype=np.int16)


class RankBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of global positions, starting at ``start`` (samples consumed)."""

    def __init__(self, start: int, global_batch: int, micro_batch: int, rank: int, world_size: int,
                 limit: int | None = None) -> None:
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global batch {global_batch} is not divisible by micro batch {micro_batch} "
                             f"x world size {world_size}")
        if start % global_batch:
            raise ValueError(f"resume position {start} is not at a global batch boundary ({global_batch})")
        self.start, self.G, self.B = start, global_batch, micro_batch
        self.rank, self.W, self.limit = rank, world_size, limit

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.G // self.W
        b = self.start // self.G
        while self.limit is None or (b + 1) * self.G <= self.start + self.limit:
            base = b * self.G + self.rank * per_rank
            for m in range(0, per_rank, self.B):
                yield list(range(base + m, base + m + self.B))
            b += 1

    def __len__(self) -> int:
        if self.limit is None:
            raise TypeError("infinite sampler")
        return self.limit // self.G * (self.G // self.W // self.B)


def check_manifest(manifest: dict[str, Any], data_dir: Path, seq_len: int | None, vocab_size: int | None,
                   tokenizer_sha256: str | None) -> None:
    """Refuse shards that do not match the model/tokenizer the trainer was configured with."""
    where = f"{data_dir}/manifest.json"
    if seq_len is not None and manifest["seq_len"] != seq_len:
        raise ValueError(f"{where}: shards have seq_len {manifest['seq_len']} but model.max_seq_len={seq_len}; "
                         "re-run prep or fix the override")
    tok = manifest["tokenizer"]
    if vocab_size is not None and vocab_size < tok["vocab_size"]:
        raise ValueError(f"{where}: tokenizer has {tok['vocab_size']} ids but model.vocab_size={vocab_size}")
    if tokenizer_sha256 is not None and tok["sha256"] != tokenizer_sha256:
        raise ValueError(f"{where}: tokenizer sha256 {tok['sha256'][:12]}… does not match "
                         f"data.tokenizer_sha256={tokenizer_sha256[:12]}…")


def open_dataset(cfg: DataConfig) -> tuple[dict[str, Any], Path]:
    data_dir = Path(cfg.path)
    manifest = load_manifest(data_dir)
    check_manifest(manifest, data_dir, None, None, cfg.tokenizer_sha256)
    return manifest, data_dir


def _ignore_preemption_signals(_: int, loader_pid: int | None = None) -> None:
    """``worker_init_fn``: loader workers outlive the scheduler's preemption signals.

    SLURM (SIGUSR1 ahead of the time limit, SIGTERM on preemption/cancel) and Kubernetes (SIGTERM)
    signal every process of the job, loader workers included. The trainer rank catches them and
    finishes its step and checkpoint; a worker that died of them would make its next ``next(it)``
    raise "DataLoader worker exited unexpectedly". So both are ignored here.

    Workers still exit when they should: when the DataLoader shuts them down (done event and
    ``None`` sentinel on their index queue), and when their parent dies (the DataLoader's watchdog
    notices the parent pid change). One SIGTERM still counts: the one the parent itself sends
    (``Process.terminate``: a shutdown whose join timed out, and multiprocessing's exit handler,
    which terminates and then joins, without timeout, the daemonic workers of a DataLoader iterator
    still alive at interpreter exit: with a plain SIG_IGN that exit hangs). SIGTERM is therefore
    blocked and taken by a thread with ``sigwaitinfo``, which sees the sender: from the
    parent it exits at once (what torch's own worker SIGTERM handler does), from anyone else it is
    dropped. ``loader_pid``, the process that owns the DataLoader, also counts as the parent (under
    the forkserver start method, the worker's parent process is the fork server). Without
    ``sigwaitinfo`` (not Linux), SIGTERM keeps torch's handler.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not (hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")):
        return
    parents = frozenset({os.getppid(), loader_pid or os.getppid()})
    # Ignored and blocked: a blocked signal is never discarded but stays pending for sigwaitinfo.
    # SIG_IGN covers threads started before this call, which do not block it (none with the fork
    # start method; under spawn/forkserver, native threads of torch, see _LOADERS_WITH_WORKERS).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
    threading.Thread(target=_sigterm_from_parent_only, args=(parents,), name="sigterm-filter", daemon=True).start()


def _sigterm_from_parent_only(parents: frozenset[int]) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid in parents:
            os._exit(0)


# Loaders whose workers ignore SIGTERM. At interpreter exit multiprocessing SIGTERMs, then joins
# without timeout, the daemonic workers still alive (a persistent-workers DataLoader keeps its
# iterator, so its workers outlive every other reference). The thread above honours that SIGTERM
# only where it is the one thread without the signal blocked: with the fork start method; under
# spawn/forkserver, native threads started by importing torch may swallow it. So the workers of
# these loaders are first shut down the ordinary way (done event, sentinel, join), by a hook that
# runs before multiprocessing's and torch's own (atexit runs the last registered first).
_LOADERS_WITH_WORKERS: weakref.WeakSet[DataLoader] = weakref.WeakSet()


def shut_down_workers(loader: DataLoader) -> None:
    """Stop the persistent workers of ``loader`` (and its pinning thread) the ordinary way: done
    event, sentinel, join. They ignore the scheduler's SIGTERM, so a trainer that is done with a
    loader calls this rather than leave them to the interpreter's exit. A no-op for a loader
    without workers or never iterated; a later ``iter(loader)`` starts new ones."""
    it = getattr(loader, "_iterator", None)
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
        loader._iterator = None


def _shut_down_loader_workers() -> None:
    for loader in list(_LOADERS_WITH_WORKERS):
        try:
            shut_down_workers(loader)
        except Exception:  # exiting anyway: multiprocessing's own handler is the fallback
            pass


# Registered after multiprocessing.util's and torch.utils.data's hooks (both imported above).
atexit.register(_shut_down_loader_workers)


def _track_loader_workers(loader: DataLoader) -> DataLoader:
    _LOADERS_WITH_WORKERS.add(loader)
    return loader


def _collate(samples: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(samples)  # (B, T+1), the stored dtype


def _collate_with_source(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return _collate([t for t, _ in samples]), torch.tensor([s for _, s in samples], dtype=torch.long)


def to_device_batch(batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) on ``device`` from a loader's (B, T+1) batch: one copy (non-blocking, so
    it overlaps with the host when the batch is pinned), widened to int64 there. Both are views of
    one (B, T+1) int64 tensor: ``inputs = b[:, :-1]``, ``targets = b[:, 1:]`` (not contiguous)."""
    b = batch.to(device, non_blocking=True).long()
    return b[:, :-1], b[:, 1:]


def _loader(ds: TokenBlocks, sampler: RankBatchSampler, collate_fn: Any, num_workers: int,
            pin_memory: bool) -> DataLoader:
    # Pinning needs an accelerator: without one DataLoader warns on every iterator and pins nothing.
    pin_memory = pin_memory and torch.cuda.is_available()
    if not num_workers:
        return DataLoader(ds, batch_sampler=sampler, num_workers=0, collate_fn=collate_fn, pin_memory=pin_memory)
    # Persistent workers: forked once per loader, not at every ``iter`` (the validation loader is
    # iterated at every evaluation). A train and a val loader thus keep 2 x num_workers processes
    # per rank alive for the whole run: each up to max_open_shards open shard files and its own
    # memory (the pages of the parent it touches, its readers, prefetch_factor batches in flight),
    # so per node ranks x 2 x num_workers x max_open_shards descriptors (8 x 2 x 4 x 16 = 1024).
    return _track_loader_workers(DataLoader(
        ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory,
        persistent_workers=True, prefetch_factor=4,
        worker_init_fn=partial(_ignore_preemption_signals, loader_pid=os.getpid())))


def train_loader(cfg: DataConfig, manifest: dict[str, Any], data_dir: Path, start: int, global_batch: int, rank: int,
                 world_size: int, pin_memory: bool = False) -> DataLoader:
    """Infinite loader of this rank's micro-batches from position ``start``: each a (B, T+1) tensor
    of the stored token dtype (see :func:`to_device_batch`). ``pin_memory``: pinned host memory,
    for copies to a CUDA device (ignored without CUDA)."""
    ds = TokenBlocks(data_dir, manifest, "train", cfg.seed, shuffle=True, max_open_shards=cfg.max_open_shards)
    sampler = RankBatchSampler(start, global_batch, cfg.micro_batch_size, rank, world_size)
    return _loader(ds, sampler, _collate, cfg.num_workers, pin_memory)


def val_loader(cfg: DataConfig, manifest: dict[str, Any], data_dir: Path, batches: int, global_batch: int, rank: int,
               world_size: int, pin_memory: bool = False) -> DataLoader:
    """(batch (B, T+1), source index (B,)) of the first ``batches`` global batches of the holdout split
    in a fixed shuffled order (seeded, so it draws from every source's shards): the same samples every
    evaluation and on any world size (each rank takes its slice of every global batch). Read by
    ``cfg.num_workers`` persistent workers, as training is; ``pin_memory`` as in :func:`train_loader`."""
    ds = TokenBlocks(data_dir, manifest, "val", cfg.seed, shuffle=True, max_open_shards=cfg.max_open_shards,
                     with_source=True)
    n = min(batches * global_batch, (len(ds) // global_batch) * global_batch)
    if n == 0:
        raise ValueError(f"{data_dir}: the val split has {len(ds)} samples, fewer than one global batch of "
                         f"{global_batch}")
    sampler = RankBatchSampler(0, global_batch, cfg.micro_batch_size, rank, world_size, limit=n)
    return _loader(ds, sampler, _collate_with_source, cfg.num_workers, pin_memory)
