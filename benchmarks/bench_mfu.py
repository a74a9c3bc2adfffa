"""Model FLOPs utilization of the real sharded training path: 125M, 350M, 1.3B (and 7B when memory
allows) at sequence length 2048 in bf16.

    python benchmarks/bench_mfu.py [--models 125m 350m 1.3b 7b] [--seq-len 2048] [--micro-batch 4]
        [--steps 50] [--warmup 10] [--nproc 1] [--compile | --no-compile] [--ac none|block|op|full]
        [--loss-chunk-tokens 8192] [--peak-tflops 989]

Runs the trainer's own backend as a run on many GPUs does: FSDP2 ``fully_shard`` with
``backend.always_shard=true`` (so one GPU goes through the same sharded path, mixed-precision
policy and reduce-scatters as N GPUs), the trainer's model build (activation checkpointing, chunked
loss, ``trainer.compile``), fused AdamW, on random tokens held on the GPU, so the figure is the
model + backend, not the data pipeline. ``--nproc N`` re-launches itself under torchrun over N GPUs.

Reports per model the MEDIAN step time over ``--steps`` measured steps after ``--warmup`` (slowest
rank per step), tokens/s per GPU, peak memory (``torch.cuda.max_memory_allocated``, max over
ranks), and MFU under two FLOP conventions:

- PaLM (the trainer's ``slimpajama_train.mfu.flops_per_token``): 6·N + 12·L·d·T per token,
  attention scores and values over the full T x T square;
- Megatron, causal-halved: 6·N + 6·L·d·T, counting only the causal half of the attention matrix.

N = matmul parameters per token (embedding lookups excluded), L layers, d model width, T sequence
length. PaLM >= Megatron always. Models in ``--large-models`` (default 7b) run with micro-batch
``--large-micro-batch`` (1) and AC ``--large-ac`` (full); a model that does not fit is recorded as
``{"model": ..., "skipped": "out of memory: ..."}`` and the others go on.

Prints a line ``{"row": {...}}`` per model as it finishes, a table, and last one JSON object with all
rows. Without a GPU it prints why it skipped (``--device cpu --models tiny`` runs the same code on
the CPU, on a gloo group of one, as a smoke test).
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402 - after the sys.path insert above
import yaml  # noqa: E402

from data_prep.cli import conf_dir  # noqa: E402
from slimpajama_train.distributed import torchrun_argv  # noqa: E402
from slimpajama_train.model import ModelConfig  # noqa: E402

AC_CHOICES = ("none", "block", "op", "full")


def model_config(name: str, vocab: int, seq_len: int) -> ModelConfig:
    fields = yaml.safe_load((conf_dir() / "model" / f"{name}.yaml").read_text())
    return replace(ModelConfig(**fields), vocab_size=vocab, max_seq_len=seq_len)


def flops_per_token_conventions(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3 x forward) under both conventions: PaLM's
    6·N + 12·L·d·T (full attention matrix) and Megatron's causal-halved 6·N + 6·L·d·T."""
    from slimpajama_train.mfu import matmul_params_per_token

    dense = 6.0 * matmul_params_per_token(cfg)
    attention_full = 12.0 * cfg.n_layers * cfg.dim * seq_len
    return {"palm": dense + attention_full, "megatron": dense + attention_full / 2}


def mfu(tokens_s_per_gpu: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    return tokens_s_per_gpu * flops_per_token / (peak_tflops * 1e12) if peak_tflops else None


def train_step(backend, tokens: torch.Tensor, lr: float) -> torch.Tensor:
    """One optimizer step on one micro-batch of ``(B, T + 1)`` tokens: the ONE place that calls the
    backend's step API (adapts to ``forward_backward(batch, last_micro)`` and to the older
    ``forward_backward(inputs, targets, last_micro)``)."""
    if "targets" in inspect.signature(backend.forward_backward).parameters:
        loss = backend.forward_backward(tokens[:, :-1], tokens[:, 1:], last_micro=True)
    else:
        loss = backend.forward_backward(tokens, last_micro=True)
    backend.step(lr)
    return loss


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc).lower()
                                              or "CUBLAS_STATUS_ALLOC_FAILED" in str(exc))


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def measure(name: str, a: argparse.Namespace, dist_info) -> dict:
    from slimpajama_train.backends import build_backend
    from slimpajama_train.backends.base import BackendConfig
    from slimpajama_train.config import TrainConfig, TrainerConfig
    from slimpajama_train.mfu import detect_peak_tflops, peak_memory_gb
    from slimpajama_train.model import count_parameters
    from slimpajama_train.optim import OptimConfig
    from slimpajama_train.trainer import build_model

    large = name in a.large_models
    micro, ac = (a.large_micro_batch, a.large_ac) if large else (a.micro_batch, a.ac)
    cfg = model_config(name, a.vocab, a.seq_len)
    backend_cfg = BackendConfig(name="fsdp2", precision=a.precision, always_shard=True, activation_checkpointing=ac,
                                ac_every=a.ac_every, loss_chunk_tokens=a.loss_chunk_tokens)
    # The trainer's own model build: AC mode, loss chunk and trainer.compile applied as a run applies them.
    train_cfg = TrainConfig(model=cfg, backend=backend_cfg, trainer=TrainerConfig(compile=a.compile))
    device = dist_info.device
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    gc.collect()  # the previous model's FSDP2 modules and hooks hold reference cycles: free them first
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    backend = build_backend(backend_cfg, dist_info)
    backend.build_model(lambda: build_model(train_cfg), 0, OptimConfig(lr=1e-4, warmup_steps=0), micro, 1)
    backend.build_optimizer()
    n_params = count_parameters(backend.model)
    tokens = torch.randint(0, a.vocab, (micro, a.seq_len + 1), device=device)
    marks: list = []
    for step in range(a.warmup + a.steps + 1):
        if step >= a.warmup:  # a mark at the start of every measured step and after the last one
            if cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                marks.append(ev)
            else:
                marks.append(time.perf_counter())
        if step < a.warmup + a.steps:
            train_step(backend, tokens, 1e-4)
    if cuda:
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(marks[:-1], marks[1:], strict=True)]
    else:
        times = [e - s for s, e in zip(marks[:-1], marks[1:], strict=True)]
    times = _max_over_ranks(times, device)  # the slowest rank sets each step's time
    mem = _max_over_ranks([peak_memory_gb(device)], device)[0]
    del backend, tokens, marks
    median = statistics.median(times)
    tps = micro * a.seq_len / median  # per GPU: each rank trains its own micro-batch every step
    fpt = flops_per_token_conventions(cfg, a.seq_len)
    peak = a.peak_tflops or detect_peak_tflops(device)
    return {
        "model": name, "params_m": n_params / 1e6, "n_layers": cfg.n_layers, "dim": cfg.dim,
        "gpus": dist_info.world_size, "micro_batch": micro, "seq_len": a.seq_len, "precision": a.precision,
        "ac": ac, "compile": a.compile, "loss_chunk_tokens": a.loss_chunk_tokens, "always_shard": True,
        "steps": a.steps, "warmup": a.warmup,
        "step_time_median_s": median, "step_time_mean_s": statistics.fmean(times),
        "step_time_min_s": min(times), "step_time_max_s": max(times),
        "tokens_s_per_gpu": tps, "tokens_s": tps * dist_info.world_size,
        "flops_per_token_palm": fpt["palm"], "flops_per_token_megatron": fpt["megatron"],
        "tflops_s_per_gpu_palm": tps * fpt["palm"] / 1e12, "tflops_s_per_gpu_megatron": tps * fpt["megatron"] / 1e12,
        "mfu_palm": mfu(tps, fpt["palm"], peak), "mfu_megatron": mfu(tps, fpt["megatron"], peak),
        "peak_tflops": peak, "peak_mem_gb": mem,
    }


def run_model(name: str, a: argparse.Namespace, dist_info) -> dict:
    """:func:`measure`, with an out-of-memory model recorded as skipped (its memory released)."""
    skipped = None
    try:
        return measure(name, a, dist_info)
    except Exception as e:  # only OOM is swallowed; anything else re-raises
        if not is_oom(e):
            raise
        skipped = f"out of memory: {str(e).splitlines()[0][:300]}"
    gc.collect()  # the failed model's tensors died with the exception's frames; cycles go here
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"model": name, "skipped": skipped}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["125m", "350m", "1.3b", "7b"], help="names of conf/model/*.yaml")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=50, help="measured steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--ac", default="none", choices=AC_CHOICES, help="backend.activation_checkpointing")
    p.add_argument("--ac-every", type=int, default=2, help="backend.ac_every (period of --ac block)")
    p.add_argument("--loss-chunk-tokens", type=int, default=8192, help="backend.loss_chunk_tokens (0: unchunked)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="trainer.compile: torch.compile each block and the loss kernels")
    p.add_argument("--large-models", nargs="*", default=["7b"],
                   help="models run with --large-micro-batch and --large-ac (memory)")
    p.add_argument("--large-micro-batch", type=int, default=1)
    p.add_argument("--large-ac", default="full", choices=AC_CHOICES)
    p.add_argument("--nproc", type=int, default=1, help="GPUs: > 1 re-launches this script under torchrun")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device dense bf16 peak; default: detected from the GPU name "
                        "(slimpajama_train.mfu.PEAK_TFLOPS_BF16)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return a


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initializes CUDA: init_distributed picks the CPU
    elif not torch.cuda.is_available():
        print("bench_mfu: no CUDA GPU on this machine; nothing measured "
              "(use --device cpu --models tiny for a smoke run)")
        print(json.dumps({"skipped": "no CUDA GPU"}))
        return
    if a.nproc > 1 and "RANK" not in os.environ:
        sys.exit(subprocess.call(torchrun_argv(a.nproc, str(Path(__file__).resolve()), argv)))

    from slimpajama_train.backends.hardware import compile_problem
    from slimpajama_train.distributed import destroy_distributed, init_distributed
    from slimpajama_train.mfu import detect_peak_tflops, mfu_off_reason

    dist_info = init_distributed()
    main_rank = dist_info.is_main
    device_name = torch.cuda.get_device_name(dist_info.device) if dist_info.device.type == "cuda" else "cpu"
    if a.compile and (problem := compile_problem(dist_info.device)):
        raise SystemExit(f"bench_mfu: --compile: {problem}")
    if main_rank and a.peak_tflops is None and (reason := mfu_off_reason(dist_info.device)):
        print(f"bench_mfu: {reason.replace('trainer.peak_tflops=', '--peak-tflops ')}", file=sys.stderr)
    rows = []
    for name in a.models:
        t0 = time.perf_counter()
        row = run_model(name, a, dist_info)
        rows.append(row)
        if main_rank:
            print(f"bench_mfu: {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            print(json.dumps({"row": row}), flush=True)
    destroy_distributed()
    if not main_rank:
        return
    print(f"\nMFU on {dist_info.world_size} x {device_name} (seq {a.seq_len}, {a.precision}, FSDP2 always_shard, "
          f"compile {'on' if a.compile else 'off'}, loss chunk {a.loss_chunk_tokens}; median of {a.steps} steps "
          f"after {a.warmup} warm-up)")
    print("| model | params | micro-batch | AC | step s (median) | tokens/s/GPU | MFU PaLM | MFU Megatron "
          "| peak mem GB |\n|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['model']} | skipped: {r['skipped'][:80]} | | | | | | | |")
            continue
        pct = [f"{100 * r[k]:.1f}%" if r[k] is not None else "n/a" for k in ("mfu_palm", "mfu_megatron")]
        print(f"| {r['model']} | {r['params_m']:.0f}M | {r['micro_batch']} | {r['ac']} | {r['step_time_median_s']:.4f} "
              f"| {r['tokens_s_per_gpu']:,.0f} | {pct[0]} | {pct[1]} | {r['peak_mem_gb']:.1f} |")
    peak = a.peak_tflops or detect_peak_tflops(dist_info.device)
    print(json.dumps({"bench": "mfu", "device": device_name, "gpus": dist_info.world_size, "peak_tflops": peak,
                      "rows": rows}))


if __name__ == "__main__":
    main()
