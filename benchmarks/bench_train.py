"""Trainer overhead: our trainer against a bare PyTorch loop (same model, batch, precision, one process).

    python benchmarks/bench_train.py [--data data/demo_shards] [--steps 30] [--warmup 5]

The trainer runs as users run it (FSDP2 on a group of one, the shard loader, per-step metrics); the
bare loop trains an unwrapped copy of the same model with AdamW on the same batches held in memory.
Prints a table and, last, one JSON object with ``trainer_tokens_s``, ``bare_loop_tokens_s`` and ``ratio``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from slimpajama_train.backends.base import BackendConfig
from slimpajama_train.callbacks.base import Callback
from slimpajama_train.callbacks.config import LoggerConfig, WandbConfig
from slimpajama_train.checkpoint import CheckpointConfig
from slimpajama_train.config import LoopConfig, TrainConfig
from slimpajama_train.data import DataConfig
from slimpajama_train.distributed import destroy_distributed, init_distributed
from slimpajama_train.model import ModelConfig, Transformer, lm_loss
from slimpajama_train.optim import OptimConfig, build_optimizer, lr_at
from slimpajama_train.trainer import Trainer


class StepClock(Callback):
    """Timestamps of the end of each step (the loop's own timing, callbacks excluded)."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    def on_step_end(self, trainer, metrics) -> None:
        self.times[metrics["step"]] = time.perf_counter()


def ensure_demo_shards(path: Path) -> None:
    if (path / "manifest.json").is_file():
        return
    corpus = path.parent / "demo_corpus"
    subprocess.run([sys.executable, "-m", "data_prep.demo_corpus", str(corpus)], check=True)
    subprocess.run([sys.executable, "-m", "data_prep.prep", f"inputs=[{corpus}/train]", f"input_root={corpus}",
                    f"output_dir={path}"], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/demo_shards")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--run-dir", default="runs/bench_train")
    a = p.parse_args()
    ensure_demo_shards(Path(a.data))
    cfg = TrainConfig(
        run_dir=a.run_dir,
        model=ModelConfig(dim=a.dim, n_layers=a.layers, n_heads=max(1, a.dim // 64), tie_embeddings=True),
        data=DataConfig(path=a.data, micro_batch_size=a.micro_batch, num_workers=1),
        optim=OptimConfig(lr=1e-3, warmup_steps=5),
        backend=BackendConfig(name="fsdp2", precision=a.precision),
        trainer=LoopConfig(max_steps=a.steps, global_batch_size=a.micro_batch, log_interval=a.steps, eval_interval=0),
        checkpoint=CheckpointConfig(interval=0, resume="none"),
        logger=LoggerConfig(console=False, metrics_file=False, wandb=WandbConfig(enabled=False)),
    )
    dist_info = init_distributed()
    clock = StepClock()
    trainer = Trainer(cfg, dist_info, callbacks=[clock])
    seq = trainer.manifest["seq_len"]
    trainer.fit()
    trainer_tps = (a.steps - a.warmup) * trainer.tokens_per_step / (clock.times[a.steps] - clock.times[a.warmup])

    # Bare loop: the same batches, pre-loaded; an unwrapped copy of the same model; nothing else.
    from slimpajama_train.data import open_dataset, train_loader

    manifest, data_dir = open_dataset(cfg.data)
    it = iter(train_loader(DataConfig(path=a.data, micro_batch_size=a.micro_batch, num_workers=0), manifest, data_dir,
                           0, a.micro_batch, 0, 1))
    batches = [next(it) for _ in range(a.steps)]
    model = Transformer(trainer.cfg.model, seed=cfg.seed)  # the resolved model config, the same initial weights
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    t_start = 0.0
    for step, (x, y) in enumerate(batches):
        if step == a.warmup:
            t_start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.optim, a.steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the trainer reads the loss every step too
    bare_tps = (a.steps - a.warmup) * a.micro_batch * seq / (time.perf_counter() - t_start)
    destroy_distributed()

    ratio = trainer_tps / bare_tps
    print("\n| loop | tokens/s | model | batch x seq | precision | threads |\n|---|---:|---|---|---|---:|")
    shape = f"{trainer.n_params / 1e6:.1f}M ({a.layers}x{a.dim})"
    for name, tps in (("slimpajama trainer (FSDP2, shard loader)", trainer_tps),
                      ("bare PyTorch loop (in-memory batches)", bare_tps)):
        print(f"| {name} | {tps:,.0f} | {shape} | {a.micro_batch} x {seq} | {a.precision} "
              f"| {torch.get_num_threads()} |")
    print(f"\nratio trainer / bare = {ratio:.3f} (target >= 0.95)")
    print(json.dumps({"trainer_tokens_s": trainer_tps, "bare_loop_tokens_s": bare_tps, "ratio": ratio,
                      "steps_timed": a.steps - a.warmup, "params": trainer.n_params, "precision": a.precision}))


if __name__ == "__main__":
    main()
