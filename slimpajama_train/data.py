"""Shard loading in the global sample order of DESIGN.md.

The order is a pure function of (manifest, seed, epoch): epoch ``e`` is a seeded permutation of all
samples of the split. Global batch ``b`` is positions ``[b·G, (b+1)·G)`` of the concatenated epochs;
rank ``r`` of ``W`` takes the contiguous slice ``[b·G + r·G/W, b·G + (r+1)·G/W)``. So the loader
state is one integer (samples consumed) and resuming, on any world size, is a seek.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_prep.shard_format import RecordLayout, ShardReader, load_manifest


@dataclass
class DataConfig:
    """Where the shards are and how they are read.

    Attributes:
        path: directory with ``manifest.json`` and the shards (output of ``slimpajama-prep``).
        seed: seeds the per-epoch permutation of samples.
        micro_batch_size: samples per rank per forward/backward.
        num_workers: DataLoader worker processes per rank.
        tokenizer_sha256: when set, the manifest's tokenizer must have this checksum.
    """

    path: str = "data/demo_shards"
    seed: int = 1234
    micro_batch_size: int = 8
    num_workers: int = 1
    tokenizer_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"data.micro_batch_size={self.micro_batch_size}: must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers}: must be >= 0")


class GlobalSampleOrder:
    """Maps a global position (across epochs) to a (shard, index) pair of one split."""

    def __init__(self, shard_samples: list[int], seed: int, shuffle: bool = True) -> None:
        self.cum = np.concatenate([[0], np.cumsum(shard_samples)]).astype(np.int64)
        self.total = int(self.cum[-1])
        if self.total == 0:
            raise ValueError("the split has no samples")
        self.seed = seed
        self.shuffle = shuffle

    @lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> np.ndarray:
        # One int64 per sample per cached epoch: 2.4 GB for SlimPajama-627B at seq 2048, acceptable
        # for a host that holds the loader; seeding by (seed, epoch) makes every epoch reproducible.
        return np.random.default_rng([self.seed, epoch]).permutation(self.total)

    def sample_id(self, position: int) -> int:
        epoch, offset = divmod(position, self.total)
        return int(self._permutation(epoch)[offset]) if self.shuffle else offset

    def locate(self, sample_id: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.cum, sample_id, side="right")) - 1
        return shard, sample_id - int(self.cum[shard])


class TokenBlocks(Dataset):
    """Map-style dataset: item ``position`` is the sample at that position of the global order."""

    def __init__(self, data_dir: Path, manifest: dict[str, Any], split: str, seed: int, shuffle: bool) -> None:
        entry = manifest["splits"].get(split)
        if not entry or not entry["shards"]:
            raise ValueError(f"{data_dir}: manifest has no {split!r} shards")
        dtype = np.dtype(manifest["dtype"])
        layout = RecordLayout(**manifest["record"])
        self.block_size = int(manifest["block_size"])
        self.order = GlobalSampleOrder([s["samples"] for s in entry["shards"]], seed, shuffle)
        self.readers = [
            ShardReader(Path(data_dir) / s["name"], i, self.block_size, dtype, layout) for i, s in enumerate(entry["shards"])
        ]
        for r in self.readers:
            if not r.path.is_file():
                raise FileNotFoundError(f"{data_dir}/manifest.json lists {r.path.name}, which is missing")

    def __len__(self) -> int:
        return self.order.total

    def __getitem__(self, position: int) -> torch.Tensor:
        shard, index = self.order.locate(self.order.sample_id(position))
        return torch.from_numpy(self.readers[shard].read(index).astype(np.int64))


class RankBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of global positions, starting at ``start`` (samples consumed)."""

    def __init__(self, start: int, global_batch: int, micro_batch: int, rank: int, world_size: int, limit: int | None = None) -> None:
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global batch {global_batch} is not divisible by micro batch {micro_batch} x world size {world_size}")
        if start % global_batch:
            raise ValueError(f"resume position {start} is not at a global batch boundary ({global_batch})")
        self.start, self.G, self.B, self.rank, self.W, self.limit = start, global_batch, micro_batch, rank, world_size, limit

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


def check_manifest(manifest: dict[str, Any], data_dir: Path, seq_len: int | None, vocab_size: int | None, tokenizer_sha256: str | None) -> None:
    """Refuse shards that do not match the model/tokenizer the trainer was configured with."""
    where = f"{data_dir}/manifest.json"
    if seq_len is not None and manifest["seq_len"] != seq_len:
        raise ValueError(f"{where}: shards have seq_len {manifest['seq_len']} but model.max_seq_len={seq_len}; re-run prep or fix the override")
    tok = manifest["tokenizer"]
    if vocab_size is not None and vocab_size < tok["vocab_size"]:
        raise ValueError(f"{where}: tokenizer has {tok['vocab_size']} ids but model.vocab_size={vocab_size}")
    if tokenizer_sha256 is not None and tok["sha256"] != tokenizer_sha256:
        raise ValueError(f"{where}: tokenizer sha256 {tok['sha256'][:12]}… does not match data.tokenizer_sha256={tokenizer_sha256[:12]}…")


def open_dataset(cfg: DataConfig) -> tuple[dict[str, Any], Path]:
    data_dir = Path(cfg.path)
    manifest = load_manifest(data_dir)
    check_manifest(manifest, data_dir, None, None, cfg.tokenizer_sha256)
    return manifest, data_dir


def _ignore_preemption_signals(_: int) -> None:
    # SIGUSR1 (SLURM's "time is nearly up", sent to every process of the job) must not kill the
    # loader workers while the trainer finishes its step and checkpoints. SIGTERM keeps its default:
    # multiprocessing stops workers with it at exit.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _collate(samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.stack(samples)  # (B, T+1)
    return blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()


def train_loader(cfg: DataConfig, manifest: dict[str, Any], data_dir: Path, start: int, global_batch: int, rank: int, world_size: int) -> DataLoader:
    """Infinite loader of (inputs, targets) micro-batches of this rank, from position ``start``."""
    ds = TokenBlocks(data_dir, manifest, "train", cfg.seed, shuffle=True)
    sampler = RankBatchSampler(start, global_batch, cfg.micro_batch_size, rank, world_size)
    return DataLoader(ds, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=_collate,
                      persistent_workers=cfg.num_workers > 0, prefetch_factor=4 if cfg.num_workers else None,
                      worker_init_fn=_ignore_preemption_signals if cfg.num_workers else None)


def val_loader(cfg: DataConfig, manifest: dict[str, Any], data_dir: Path, batches: int, global_batch: int, rank: int, world_size: int) -> DataLoader:
    """The first ``batches`` global batches of the holdout split, in file order: the same samples every
    evaluation and on any world size (each rank takes its slice of every global batch)."""
    ds = TokenBlocks(data_dir, manifest, "val", cfg.seed, shuffle=False)
    n = min(batches * global_batch, (len(ds) // global_batch) * global_batch)
    if n == 0:
        raise ValueError(f"{data_dir}: the val split has {len(ds)} samples, fewer than one global batch of {global_batch}")
    sampler = RankBatchSampler(0, global_batch, cfg.micro_batch_size, rank, world_size, limit=n)
    return DataLoader(ds, batch_sampler=sampler, num_workers=0, collate_fn=_collate)
