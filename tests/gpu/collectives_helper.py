"""Test helper, run under torchrun: the collectives training uses, on the trainer's own process group
(``init_distributed``: NCCL for device tensors, gloo for host tensors), each checked for its values.
Rank 0 prints one JSON line naming the checks that passed; any wrong value raises."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402 - after the sys.path insert above
import torch.distributed as dist  # noqa: E402

import slimpajama_train.distributed as sd  # noqa: E402


def main() -> None:
    info = sd.init_distributed()
    rank, world, dev = info.rank, info.world_size, info.device
    assert dev.type == "cuda", f"expected a CUDA device, got {dev}"
    done = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        if not ok:
            raise AssertionError(f"rank {rank}: {name} gave a wrong result {detail}")
        done.append(name)

    tri = world * (world + 1) / 2
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.full((1 << 20,), float(rank + 1), dtype=dtype, device=dev)
        dist.all_reduce(x)
        check(f"all_reduce_sum_{dtype}", bool((x == tri).all()), f"{x[0].item()} != {tri}")
    x = torch.full((1024,), float(rank), device=dev)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    check("all_reduce_max", bool((x == world - 1).all()))
    x = torch.full((4,), float(rank), device=dev)
    work = dist.all_reduce(x, async_op=True)
    work.wait()
    check("all_reduce_async", bool((x == world * (world - 1) / 2).all()))

    shard = torch.full((8,), float(rank), device=dev)
    gathered = torch.empty(8 * world, device=dev)
    dist.all_gather_into_tensor(gathered, shard)  # FSDP2's parameter all-gather
    check("all_gather_into_tensor", torch.equal(gathered, torch.arange(world, device=dev).float().repeat_interleave(8)))
    full = torch.arange(8 * world, device=dev, dtype=torch.float32)
    out = torch.empty(8, device=dev)
    dist.reduce_scatter_tensor(out, full)  # FSDP2's gradient reduce-scatter
    check("reduce_scatter_tensor", torch.equal(out, world * torch.arange(8 * rank, 8 * rank + 8, device=dev).float()))
    b = torch.full((16,), float(rank + 7), device=dev)
    dist.broadcast(b, src=0)
    check("broadcast", bool((b == 7).all()))
    send = torch.arange(world, device=dev, dtype=torch.float32) + 100 * rank
    recv = torch.empty(world, device=dev)
    dist.all_to_all_single(recv, send)
    check("all_to_all_single", torch.equal(recv, torch.arange(world, device=dev).float() * 100 + rank))

    host = torch.full((3,), float(rank + 1))
    dist.all_reduce(host)  # a CPU tensor goes to the gloo half of the default group
    check("all_reduce_cpu_tensor_gloo", bool((host == tri).all()))
    gloo = dist.new_group(backend="gloo")  # what FSDP2's async checkpoint save writes over
    g = torch.ones(2)
    dist.all_reduce(g, group=gloo)
    check("gloo_subgroup", bool((g == world).all()))
    summed = sd.all_reduce_sum([1.0, float(rank)], dev)
    check("all_reduce_sum_helper", summed == [float(world), world * (world - 1) / 2], str(summed))
    if hasattr(sd, "AsyncVote"):
        vote = sd.AsyncVote()
        vote.start(rank == world - 1)  # the preemption vote: one rank says stop
        check("async_vote", vote.result() is True)
        vote.start(False)
        check("async_vote_no", vote.result() is False)
    sd.barrier()
    check("barrier", True)
    try:  # the backend object that serves CUDA tensors in the default group
        backend = type(dist.distributed_c10d._get_default_group()._get_backend(dev)).__name__
    except (AttributeError, RuntimeError):
        backend = str(dist.get_backend())
    check("nccl_backend", "nccl" in backend.lower(), backend)
    sd.destroy_distributed()
    if rank == 0:
        print(json.dumps({"world": world, "backend": backend, "checks": done}), flush=True)


if __name__ == "__main__":
    main()
