"""Process-group setup for torchrun (or a single plain process) and small collective helpers.

On GPUs the default group has two backends, ``cuda:nccl,cpu:gloo``: NCCL for the training's device
tensors, gloo for the ``*_object`` helpers (of libraries and here), which pickle through tensors of
their own choice. The project's rule: a collective on the default group carries tensors on the
training device; host tensors go only over an explicit gloo group (:func:`host_group`, the stop
vote's). An NCCL-only default group would raise "No backend type associated with device type cpu"
on the first CPU tensor. Every collective of ``slimpajama_train`` goes through the helpers here:
``tests/slimpajama_train/test_collectives.py`` checks both (a scan of the sources, and a guarded run).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

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


# The gloo group of host_group() and the timeout it gets: process-wide, like the default group.
_host: dict = {"group": None, "timeout": None}


def set_collective_timeout(seconds: float) -> None:
    """Change the collective timeout of the default group and of :func:`host_group` (start-up and
    resume run under a long one, steps a short one)."""
    _host["timeout"] = timedelta(seconds=seconds)
    if dist.is_initialized():
        dist.distributed_c10d._set_pg_timeout(_host["timeout"])
        if _host["group"] is not None:
            dist.distributed_c10d._set_pg_timeout(_host["timeout"], _host["group"])


def host_group() -> dist.ProcessGroup | None:
    """A gloo group of all ranks for collectives on host tensors (None alone: nothing to reduce).

    Created on first use, which must come at the same point on every rank (``new_group`` is
    collective, and groups are matched by creation order); kept until :func:`destroy_distributed`.
    Gloo runs each asynchronous collective on a thread of its own, apart from the device's streams:
    waiting for one waits for the other ranks' hosts, never for a device.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    if _host["group"] is None:
        _host["group"] = dist.new_group(backend="gloo", timeout=_host["timeout"])
    return _host["group"]


def destroy_distributed(barrier: bool = False) -> None:
    """Leave the process group; with ``barrier`` (after a clean run), first wait until every rank is done."""
    if dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    _host["group"] = None


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Sum a few Python floats across ranks in one collective (on the device the default group's
    fast backend serves)."""
    t = torch.tensor(values, dtype=torch.float64, device=device or _device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` (on the training device) across ranks in place; returns it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (on the training device), concatenated in rank order along dim 0."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    out = torch.empty((dist.get_world_size() * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    # all_gather_single is the newer name (torch deprecates all_gather_into_tensor where it has it).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
    """A yes/no vote across ranks that never waits for the device: :meth:`start` launches an
    asynchronous all-reduce of a one-element host tensor over :func:`host_group`; :meth:`result`
    reads it one step later, when gloo's thread has long finished it: ``work.wait()`` is a wait on
    that host thread (on the other ranks' hosts at worst), and the read is one of host memory.
    CPU and GPU runs take the same path (an earlier version reduced a device tensor and waited on
    a CUDA event every step, which kept the host at most one step ahead of the GPU).

    Every rank calls both at the same steps, so all ranks read the same sum at the same step: the
    stop decision it carries is global and deterministic, one step after the signal is voted.
    """

    def __init__(self) -> None:
        self._group = host_group()
        self._pending: tuple[dist.Work | None, torch.Tensor] | None = None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def start(self, flag: bool) -> None:
        if self._pending is not None:
            raise RuntimeError("AsyncVote.start() before the previous vote was read")
        votes = torch.tensor([1 if flag else 0], dtype=torch.int32)  # host memory: what gloo reduces
        work = dist.all_reduce(votes, group=self._group, async_op=True) if self._group is not None else None
        self._pending = (work, votes)

    def result(self) -> bool:
        """True when any rank voted yes (blocks only while another rank has not voted yet)."""
        if self._pending is None:
            raise RuntimeError("AsyncVote.result() without a vote in flight")
        work, votes = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        return bool(votes.numpy()[0] > 0)


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
