"""Process-group setup for torchrun (or a single plain process) and small collective helpers.

On GPUs the default group has two backends, ``cuda:nccl,cpu:gloo``: NCCL for the training's device
tensors, gloo for the few host-side collectives (checkpoint bookkeeping, ``*_object`` helpers of
libraries). An NCCL-only group raises "No backend type associated with device type cpu" on the
first collective over a CPU tensor, so every collective here uses device tensors anyway, and
``tests/slimpajama_train/test_collectives.py`` checks that no module relies on anything else.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistConfig:
    """Process-group timeouts.

    Attributes:
        init_timeout_s: collective timeout during start-up and resume (a ZeRO universal-checkpoint
            conversion on rank 0 while the others wait): long.
        step_timeout_s: collective timeout once training runs, checkpoint saves included (each rank
            writes only its shards): short enough that a hung rank ends the job (and a restart
            resumes) instead of holding 512 GPUs for the default 30 minutes.
    """

    init_timeout_s: float = 1800.0
    step_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.init_timeout_s <= 0 or self.step_timeout_s <= 0:
            raise ValueError(f"dist.init_timeout_s={self.init_timeout_s} and "
                             f"dist.step_timeout_s={self.step_timeout_s} must be > 0")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_group_backend(cuda: bool) -> str:
    """The default group's backend string: NCCL for device tensors plus gloo for CPU tensors on GPUs."""
    return "cuda:nccl,cpu:gloo" if cuda else "gloo"


def init_distributed(cfg: DistConfig | None = None) -> DistInfo:
    """Join the process group torchrun describes; alone, form a group of one (same code paths)."""
    cfg = cfg or DistConfig()
    cuda = torch.cuda.is_available()
    timeout = timedelta(seconds=cfg.init_timeout_s)
    backend = process_group_backend(cuda)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timeout)
    else:
        rank, world, local = 0, 1, 0
        if not dist.is_initialized():
            # A HashStore group of one keeps every code path (FSDP2, DCP) identical to the multi-process case.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return DistInfo(rank, local, world, device)


def set_collective_timeout(seconds: float) -> None:
    """Change the default group's timeout (start-up and resume run under a long one, steps a short one)."""
    if dist.is_initialized():
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds))


def destroy_distributed(barrier: bool = False) -> None:
    """Leave the process group; with ``barrier`` (after a clean run), first wait until every rank is done."""
    if dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Sum a few Python floats across ranks in one collective (on the device the default group's
    fast backend serves)."""
    t = torch.tensor(values, dtype=torch.float64, device=device or _device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_ranks_true(flag: bool) -> bool:
    """True when ``flag`` holds on every rank (one small collective on the device)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    return all_reduce_sum([0.0 if flag else 1.0])[0] == 0.0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        # On NCCL a plain barrier guesses a device from the rank; name it so it never picks a wrong GPU.
        dist.barrier(device_ids=[torch.cuda.current_device()] if torch.cuda.is_available() else None)


def world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
