"""Model FLOPs utilization on one GPU: 125M, 350M and 1.3B at sequence length 2048 in bf16.

    python benchmarks/bench_mfu.py [--models 125m 350m 1.3b] [--seq-len 2048] [--steps 20] [--peak-tflops 989]

Runs the trainer's own backend (FSDP2 path, bf16, fused AdamW) on random tokens held on the GPU,
so the figure is the model + backend, not the data pipeline. Without a GPU it prints why it skipped
(``--device cpu --models tiny`` runs the same code on the CPU as a smoke test).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
import yaml

from data_prep.config import conf_dir
from slimpajama_train.backends import build_backend
from slimpajama_train.backends.base import BackendConfig
from slimpajama_train.distributed import destroy_distributed, init_distributed
from slimpajama_train.metrics import detect_peak_tflops, flops_per_token, mfu_off_reason, peak_memory_gb
from slimpajama_train.model import ModelConfig, Transformer, count_parameters
from slimpajama_train.optim import OptimConfig


def model_config(name: str, vocab: int, seq_len: int) -> ModelConfig:
    fields = yaml.safe_load((conf_dir() / "model" / f"{name}.yaml").read_text())
    return replace(ModelConfig(**fields), vocab_size=vocab, max_seq_len=seq_len)


def measure(name: str, a: argparse.Namespace, dist_info) -> dict:
    cfg = model_config(name, a.vocab, a.seq_len)
    torch.manual_seed(0)

    def make_model() -> Transformer:  # built uninitialized; the backend shards and initializes it
        model = Transformer(cfg, seed=None)
        model.set_activation_checkpointing(a.ac, 2)
        return model

    backend = build_backend(BackendConfig(name="fsdp2", precision=a.precision, activation_checkpointing=a.ac),
                            dist_info)
    backend.setup(make_model, 0, OptimConfig(lr=1e-4, warmup_steps=0), a.micro_batch, 1)
    model = backend.model
    n_params = count_parameters(model)
    x = torch.randint(0, a.vocab, (a.micro_batch, a.seq_len + 1), device=dist_info.device)
    sync = torch.cuda.synchronize if dist_info.device.type == "cuda" else (lambda: None)
    if dist_info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = 0.0
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            sync()
            t0 = time.perf_counter()
        backend.forward_backward(x[:, :-1], x[:, 1:], last_micro=True)
        backend.step(1e-4)
    sync()
    dt = time.perf_counter() - t0
    tps = a.steps * a.micro_batch * a.seq_len / dt
    fpt = flops_per_token(cfg, a.seq_len)
    peak = a.peak_tflops or detect_peak_tflops(dist_info.device)
    mem = peak_memory_gb(dist_info.device)
    del backend, model
    if dist_info.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": name, "params_m": n_params / 1e6, "tokens_s": tps, "tflops_s": tps * fpt / 1e12,
            "mfu": tps * fpt / (peak * 1e12) if peak else None, "peak_mem_gb": mem,
            "micro_batch": a.micro_batch, "seq_len": a.seq_len, "precision": a.precision, "ac": a.ac}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["125m", "350m", "1.3b"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--ac", default="none", choices=["none", "selective", "full"])
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device dense bf16 peak; default: detected from the GPU name "
                        "(slimpajama_train.metrics.PEAK_TFLOPS_BF16)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_mfu: no CUDA GPU on this machine; nothing measured "
              "(use --device cpu --models tiny for a smoke run)")
        print(json.dumps({"skipped": "no CUDA GPU"}))
        return
    dist_info = init_distributed()
    device_name = torch.cuda.get_device_name() if dist_info.device.type == "cuda" else "cpu"
    if a.peak_tflops is None and (reason := mfu_off_reason(dist_info.device)):
        print(f"bench_mfu: {reason.replace('trainer.peak_tflops=', '--peak-tflops ')}")
    rows = [measure(m, a, dist_info) for m in a.models]
    destroy_distributed()
    print(f"\nMFU on {device_name} (seq {a.seq_len}, micro-batch {a.micro_batch}, {a.precision}, AC {a.ac})")
    print("| model | params | tokens/s | TFLOP/s | MFU | peak mem GB |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['model']} | {r['params_m']:.0f}M | {r['tokens_s']:,.0f} | {r['tflops_s']:.1f} | {mfu} "
              f"| {r['peak_mem_gb']:.1f} |")
    print(json.dumps({"device": device_name, "rows": rows}))


if __name__ == "__main__":
    main()
