"""All-reduce bus bandwidth over the local GPUs, in nccl-tests' convention.

    python benchmarks/bench_nccl.py [--nproc N] [--sizes-mb 8 32 128 512 1024] [--iters 20] [--warmup 5]

For each buffer size S (bytes per rank) it times ``--iters`` back-to-back ``all_reduce`` (sum) calls
after ``--warmup`` (CUDA events; the slowest rank's mean time t) and reports, as nccl-tests'
``all_reduce_perf`` does::

    algbw = S / t            busbw = algbw * 2 (n - 1) / n

busbw is the figure to compare with the links' peak (NVLink, PCIe, network): a ring all-reduce
moves 2 (n - 1) / n of the buffer over each rank's link. It needs n >= 2; on one GPU the
all-reduce time is still reported, with busbw null and the reason. ``--nproc N`` (default: every
visible GPU) re-launches this script under torchrun. The process group is the trainer's
(``slimpajama_train.distributed.init_distributed``: NCCL for device tensors). ``--device cpu`` runs
the same over gloo (a smoke test of this script, not a network figure). Prints a table and, last,
one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402 - after the sys.path insert above

from slimpajama_train.distributed import torchrun_argv  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bus_bandwidth(nbytes: int, seconds: float, world: int) -> tuple[float, float | None]:
    """(algbw, busbw) in GB/s (1e9 bytes) of an all-reduce of ``nbytes`` per rank that took
    ``seconds`` over ``world`` ranks; busbw is None for a single rank (no data crosses a link)."""
    algbw = nbytes / seconds / 1e9
    return algbw, (algbw * 2 * (world - 1) / world if world > 1 else None)


def time_all_reduce(nbytes: int, dtype: torch.dtype, iters: int, warmup: int, device: torch.device) -> float:
    """Mean seconds of one all-reduce of ``nbytes`` on this rank (all ranks start together)."""
    import torch.distributed as dist

    from slimpajama_train.distributed import barrier

    numel = max(1, nbytes // torch.tensor([], dtype=dtype).element_size())
    buf = torch.ones(numel, dtype=dtype, device=device)
    for _ in range(warmup):
        dist.all_reduce(buf)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    barrier()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dist.all_reduce(buf)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / iters
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(buf)
        seconds = (time.perf_counter() - t0) / iters
    del buf
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: every visible GPU; 1 on --device cpu)")
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[8, 32, 128, 512, 1024],
                   help="buffer sizes per rank in MiB")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = p.parse_args(argv)
    if a.iters < 1 or a.warmup < 0 or any(s <= 0 for s in a.sizes_mb):
        p.error("--iters must be >= 1, --warmup >= 0 and every size > 0")
    return a


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initializes CUDA: gloo on the CPU
    elif not torch.cuda.is_available():
        print("bench_nccl: no CUDA GPU on this machine; nothing measured (--device cpu runs it over gloo)")
        print(json.dumps({"bench": "nccl", "skipped": "no CUDA GPU"}))
        return
    nproc = a.nproc or (torch.cuda.device_count() if a.device == "cuda" else 1)
    if nproc > 1 and "RANK" not in os.environ:
        sys.exit(subprocess.call(torchrun_argv(nproc, str(Path(__file__).resolve()), argv)))

    import torch.distributed as dist

    from slimpajama_train.distributed import destroy_distributed, init_distributed

    info = init_distributed()
    world, device = info.world_size, info.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for mb in a.sizes_mb:
        nbytes = int(mb * 2**20)
        seconds = time_all_reduce(nbytes, DTYPES[a.dtype], a.iters, a.warmup, device)
        t = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's time
        seconds = t.item()
        algbw, busbw = bus_bandwidth(nbytes, seconds, world)
        rows.append({"size_bytes": nbytes, "time_us": seconds * 1e6, "algbw_gbs": algbw, "busbw_gbs": busbw})
    backend = str(dist.get_backend())
    destroy_distributed()
    if not info.is_main:
        return
    out = {"bench": "nccl", "op": "all_reduce", "device": name, "gpus": world if device.type == "cuda" else 0,
           "ranks": world, "backend": backend, "dtype": a.dtype, "iters": a.iters, "rows": rows}
    if world > 1:
        best = max(rows, key=lambda r: r["busbw_gbs"])
        out.update(busbw_gbs_max=best["busbw_gbs"], busbw_size_bytes=best["size_bytes"])
    else:
        out.update(busbw_gbs_max=None,
                   busbw_skipped="busbw needs >= 2 GPUs (one rank moves no data over a link); "
                                 "time_us is the single-rank all_reduce time")
    print(f"\nall_reduce ({a.dtype}, sum) over {world} x {name}, backend {backend}, mean of {a.iters} after {a.warmup}")
    print("| size | time us | algbw GB/s | busbw GB/s |\n|---:|---:|---:|---:|")
    for r in rows:
        bus = f"{r['busbw_gbs']:.1f}" if r["busbw_gbs"] is not None else "n/a (1 rank)"
        print(f"| {r['size_bytes'] / 2**20:g} MiB | {r['time_us']:.1f} | {r['algbw_gbs']:.1f} | {bus} |")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
