"""This rank's micro-batches: the sampler over global positions and the train and val loaders.

Batches leave the loader as they are stored: one (B, T+1) tensor of the shard's token dtype per
micro-batch (uint16 for vocabularies of up to 2**16 ids, int32 for uint32 shards), pinned when
training on CUDA. :func:`to_device_batch` moves it in one non-blocking copy and widens it to int64
on the device: a quarter of the int64 bytes (uint16) through the workers' shared memory, the pinning
thread and PCIe, and one copy where inputs and targets took two.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from slimpajama_train.data.dataset import DataConfig, TokenBlocks, check_cache_fits
from slimpajama_train.data.workers import ignore_preemption_signals, track_loader_workers, worker_start_slots


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
    started = worker_start_slots(num_workers)  # each worker's pid once it runs: workers.start_workers
    loader = DataLoader(
        ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory,
        persistent_workers=True, prefetch_factor=4,
        worker_init_fn=partial(ignore_preemption_signals, loader_pid=os.getpid(), started=started))
    loader.worker_started = started
    return track_loader_workers(loader)


def train_loader(cfg: DataConfig, manifest: dict[str, Any], data_dir: str | Path, start: int, global_batch: int,
                 rank: int, world_size: int, pin_memory: bool = False) -> DataLoader:
    """Infinite loader of this rank's micro-batches from position ``start``: each a (B, T+1) tensor
    of the stored token dtype (see :func:`to_device_batch`). ``pin_memory``: pinned host memory,
    for copies to a CUDA device (ignored without CUDA)."""
    check_cache_fits(cfg, manifest, data_dir)
    ds = TokenBlocks(data_dir, manifest, "train", cfg.seed, shuffle=True, max_open_shards=cfg.max_open_shards,
                     order=cfg.order, block_shards=cfg.block_shards, cache=cfg.cache_spec())
    sampler = RankBatchSampler(start, global_batch, cfg.micro_batch_size, rank, world_size)
    return _loader(ds, sampler, _collate, cfg.num_workers, pin_memory)


def val_loader(cfg: DataConfig, manifest: dict[str, Any], data_dir: str | Path, batches: int, global_batch: int,
               rank: int, world_size: int, pin_memory: bool = False) -> DataLoader:
    """(batch (B, T+1), source index (B,)) of the first ``batches`` global batches of the holdout split
    in a fixed shuffled order (seeded, so it draws from every source's shards): the same samples every
    evaluation and on any world size (each rank takes its slice of every global batch). Read by
    ``cfg.num_workers`` persistent workers, as training is; ``pin_memory`` as in :func:`train_loader`."""
    ds = TokenBlocks(data_dir, manifest, "val", cfg.seed, shuffle=True, max_open_shards=cfg.max_open_shards,
                     with_source=True, cache=cfg.cache_spec())
    n = min(batches * global_batch, (len(ds) // global_batch) * global_batch)
    if n == 0:
        raise ValueError(f"{data_dir}: the val split has {len(ds)} samples, fewer than one global batch of "
                         f"{global_batch}")
    sampler = RankBatchSampler(0, global_batch, cfg.micro_batch_size, rank, world_size, limit=n)
    return _loader(ds, sampler, _collate_with_source, cfg.num_workers, pin_memory)
