"""Process-group setup for torchrun (or a single plain process) and small collective helpers.

On GPUs the default group has two backends, ``cuda:nccl,cpu:gloo``: NCCL for the training's device
tensors, gloo for the few host-side collectives (checkpoint bookkeeping, ``*_object`` helpers of
libraries). An NCCL-only group raises "No backend type associated with device type cpu" on the
first collective over a CPU tensor, so every collective here uses device tensors anyway, and
``tests/slimpajama_train/test_collectives.py`` checks that no module relies on anything else.
"""
from __future__ import annotations

import os
import sys
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


class AsyncVote:
    """A yes/no vote across ranks that never stalls a step: :meth:`start` launches a one-element
    asynchronous all-reduce on the device; :meth:`result` reads it one step later, when it has long
    completed (on CUDA through pinned host memory after an event, not a blocking device copy).

    Every rank calls both at the same steps, so all ranks read the same sum at the same step: the
    stop decision it carries is global and deterministic, one step after the signal is voted.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pending: tuple | None = None
        self._multi = dist.is_initialized() and dist.get_world_size() > 1
        # One pinned landing buffer, reused: a vote is read before the next one starts.
        self._host = torch.empty(1, dtype=torch.float32, pin_memory=device.type == "cuda")

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def start(self, flag: bool) -> None:
        if self._pending is not None:
            raise RuntimeError("AsyncVote.start() before the previous vote was read")
        t = torch.full((1,), 1.0 if flag else 0.0, dtype=torch.float32, device=self.device)  # a fill: no copy
        work = dist.all_reduce(t, async_op=True) if self._multi else None
        event = None
        if self.device.type == "cuda":
            if work is not None:
                work.wait()  # on NCCL: the current stream waits for the reduction; the host does not
            host = self._host
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            work = None
        else:
            host = t
        self._pending = (work, host, event)

    def result(self) -> bool:
        """True when any rank voted yes (blocks only if the reduction has not finished yet)."""
        if self._pending is None:
            raise RuntimeError("AsyncVote.result() without a vote in flight")
        work, host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        if work is not None:
            work.wait()
        # A host-memory read (numpy view of a CPU tensor), not a device transfer.
        return bool(host.numpy()[0] > 0)


def torchrun_argv(nproc: int, script: str, args: list[str]) -> list[str]:
    """``script`` with ``args`` under torchrun over ``nproc`` local processes, without a ``--nproc``
    option of the script's own (torchrun's parser would take it for an abbreviation of its
    ``--nproc-per-node``): how a benchmark re-launches itself over all local GPUs."""
    rest, skip = [], False
    for arg in args:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script, *rest]
