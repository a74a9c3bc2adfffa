"""Trainer overhead: our trainer against a bare PyTorch loop (same model, kernels, batch, precision, device;
one process).

    python benchmarks/bench_train.py [--data data/demo_shards] [--steps 30] [--warmup 5] [--repeats 5]
        [--device auto|cuda|cpu]
    python benchmarks/bench_train.py --synthetic --data /tmp/synthetic_shards --seq-len 1024   # no data_prep needed

The trainer runs as users run it (FSDP2 backend: unwrapped on one process unless ``--always-shard``,
the shard loader, metrics on log steps). The bare loop trains the model the trainer builds
(``trainer.build_model``: the chunked loss, activation checkpointing, ``torch.compile`` of the blocks
when on), initialized the same way, with the trainer's optimizer (``optim.build_optimizer``: fused
AdamW) and gradient clipping, on the same batches held in device memory, reading the loss on the
steps the trainer logs: what is left between the two is the trainer's own overhead (loader, step
records, callbacks, stop vote). On CUDA both run in bf16 by default (fp32 on CPU).

On a shared machine the speed drifts over a run, so the two alternate: ``--repeats`` pairs, each a
trainer run and a bare run back to back (in turn first), each building its model afresh and timing
the steps after ``--warmup``. The ratio of each pair, trainer / bare, is a paired measurement; the
median over the pairs is the result and the lowest and highest pair its spread. Prints a table
and, last, one JSON object with ``ratio`` (the median), ``ratio_min``, ``ratio_max``, ``ratios``,
``trainer_tokens_s`` and ``bare_loop_tokens_s`` (medians); on the CPU also ``cpu_time_ratio``, the
same ratio of tokens per CPU second of this process (steadier than wall time on a machine shared
with other work; the trainer's loader workers are other processes).

``--synthetic`` writes shards of synthetic token sequences in prep's format (:func:`write_synthetic_shards`)
instead of building the demo corpus, which needs data_prep's dependencies (zstandard, rensa,
matplotlib); the GPU check (``benchmarks/gpu_check.py``) and ``tests/gpu`` use it.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data_prep.shard_format import (  # noqa: E402 - after the sys.path insert above
    FORMAT_VERSION,
    MANIFEST,
    RecordLayout,
    ShardWriter,
    shard_name,
    token_dtype,
)
from slimpajama_train.callbacks.base import Callback  # noqa: E402 - imports no torch (--device cpu must come first)

SYNTHETIC_SOURCE = "synthetic"


def synthetic_tokens(n: int, block: int, vocab: int, seed: int) -> np.ndarray:
    """``(n, block)`` token ids that a model learns from within a few steps: each token is, with
    probability 1/2, the previous one plus one (mod vocab), else a draw from a Zipf-like unigram
    distribution over a random permutation of the vocabulary. The loss starts near ln(vocab) and
    falls quickly (the unigram frequencies, then the +1 rule), as it does on text."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, vocab + 1) ** 1.1
    cdf = np.cumsum(weights / weights.sum())
    perm = rng.permutation(vocab)
    draws = perm[np.minimum(np.searchsorted(cdf, rng.random((n, block))), vocab - 1)]
    follow = rng.random((n, block)) < 0.5
    out = draws.copy()
    for t in range(1, block):
        out[:, t] = np.where(follow[:, t], (out[:, t - 1] + 1) % vocab, draws[:, t])
    return out


def write_synthetic_shards(path: Path, vocab_size: int = 32000, seq_len: int = 256, train_samples: int = 4096,
                           val_samples: int = 128, samples_per_shard: int = 1024, seed: int = 0) -> Path:
    """A dataset in prep's shard format (``manifest.json``, ``train-*.tar``, ``val-*.tar``) holding
    :func:`synthetic_tokens`, written with prep's own :class:`ShardWriter`; no tokenizer is trained
    (``tokenizer.model`` is a placeholder the trainer only copies into checkpoints). Needs numpy
    only. Reuses ``path`` when it already holds the same synthetic set."""
    path = Path(path)
    params = {"synthetic": True, "vocab_size": vocab_size, "seq_len": seq_len, "train_samples": train_samples,
              "val_samples": val_samples, "samples_per_shard": samples_per_shard, "seed": seed}
    manifest_path = path / MANIFEST
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("prep_config") == params:
        return path
    path.mkdir(parents=True, exist_ok=True)
    block = seq_len + 1
    dtype = token_dtype(vocab_size)
    layout = RecordLayout.for_block(block, dtype)
    tokenizer = (b"placeholder: synthetic shards of benchmarks/bench_train.py (no tokenizer was trained)\n"
                 + json.dumps(params, sort_keys=True).encode())
    (path / "tokenizer.model").write_bytes(tokenizer)

    def split(name: str, n: int, split_seed: int) -> dict:
        tokens = synthetic_tokens(n, block, vocab_size, split_seed)
        shards = []
        for i, start in enumerate(range(0, n, samples_per_shard)):
            writer = ShardWriter(path / shard_name(name, i), i, dtype)
            for row in tokens[start:start + samples_per_shard]:
                writer.add(row, {SYNTHETIC_SOURCE: block})
            shards.append(writer.close(block))
        return {"shards": shards, "samples": n, "tokens": n * block, "bytes": sum(s["bytes"] for s in shards),
                "tokens_per_source": {SYNTHETIC_SOURCE: n * block}, "proportions": {SYNTHETIC_SOURCE: 1.0}}

    splits = {"train": split("train", train_samples, seed), "val": split("val", val_samples, seed + 1)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"file": "tokenizer.model", "sha256": hashlib.sha256(tokenizer).hexdigest(),
                      "vocab_size": vocab_size, "bos_id": 1, "eos_id": 2, "pad_id": -1, "unk_id": 0},
        "seq_len": seq_len,
        "block_size": block,
        "dtype": dtype.name,
        "record": {"record_bytes": layout.record_bytes, "npy_header_bytes": layout.npy_header_bytes},
        "splits": splits,
        "totals": {k: sum(s[k] for s in splits.values()) for k in ("samples", "tokens", "bytes")},
        "prep_config": params,
        "prep_config_hash": hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16],
    }
    tmp = manifest_path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)
    return path


def ensure_demo_shards(path: Path) -> None:
    if (path / "manifest.json").is_file():
        return
    corpus = path.parent / "demo_corpus"
    subprocess.run([sys.executable, "-m", "data_prep.demo_corpus", str(corpus)], check=True)
    subprocess.run([sys.executable, "-m", "data_prep.prep", f"inputs=[{corpus}/train]", f"input_root={corpus}",
                    f"output_dir={path}"], check=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/demo_shards")
    p.add_argument("--synthetic", action="store_true",
                   help="write synthetic shards to --data (unless it holds them) instead of building the demo corpus")
    p.add_argument("--seq-len", type=int, default=256, help="sequence length of --synthetic shards")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary of --synthetic shards")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps of each run not timed")
    p.add_argument("--repeats", type=int, default=5,
                   help="trainer/bare pairs, alternating (the median ratio is reported)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: CUDA when there is a GPU; cpu hides the GPUs from this process")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--always-shard", action="store_true", help="the trainer wraps the model in FSDP2 on one process")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks in both loops (trainer.compile)")
    p.add_argument("--run-dir", default="runs/bench_train")
    a = p.parse_args(argv)
    if a.warmup < 0 or a.steps <= a.warmup:
        p.error(f"--steps ({a.steps}) must exceed --warmup ({a.warmup}) >= 0")
    if a.repeats < 1:
        p.error(f"--repeats {a.repeats}: must be >= 1")
    return a


class StepClock(Callback):
    """Wall time from the start of step ``warmup + 1`` to the end of step ``steps``, the device
    drained at both ends (the trainer reads the device only on log steps: per-step host times
    would be the host's queueing, not the step)."""

    name = "step_clock"

    def __init__(self, warmup: int, steps: int, sync) -> None:
        self.warmup, self.steps, self.sync = warmup, steps, sync
        self.t0 = self.t1 = self.cpu_s = None

    def on_step_start(self, trainer) -> None:
        if trainer.step == self.warmup:
            self.sync()
            self.t0, self._cpu0 = time.perf_counter(), time.process_time()

    def on_step_end(self, trainer, metrics) -> None:
        if metrics.get("step") == self.steps:
            self.sync()
            self.t1, self.cpu_s = time.perf_counter(), time.process_time() - self._cpu0


def bare_loop_seconds(cfg, batches: list, device, dtype, warmup: int, sync) -> tuple[float, float]:
    """Wall and CPU seconds (of this process) of the steps after ``warmup`` of a bare loop over
    ``batches`` ((inputs, targets) on the device): the trainer's model (``build_model``: chunked
    loss, AC, compile as configured), initialized as the trainer's backend does, the trainer's
    optimizer and clipping, and its garbage-collector policy (frozen, collected every
    ``trainer.gc_interval`` steps); nothing else."""
    import torch

    from slimpajama_train.backends.fsdp2 import global_grad_norm
    from slimpajama_train.optim import build_optimizer, lr_at
    from slimpajama_train.trainer import build_model, collector_frozen

    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(cfg.seed)
    opt = build_optimizer(model, cfg.optim, device)
    model.train()
    steps, t_start, cpu_start, gc_interval = len(batches), 0.0, 0.0, cfg.trainer.gc_interval
    with collector_frozen(gc_interval):  # the trainer's garbage-collector policy too (a process setting)
        for step, (x, y) in enumerate(batches):
            if step == warmup:
                sync()
                t_start, cpu_start = time.perf_counter(), time.process_time()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(x, y)  # the loss as the trainer computes it (chunked unless loss_chunk_tokens=0)
            loss.backward()
            params = [p for p in model.parameters() if p.grad is not None]
            norm = global_grad_norm([p.grad for p in params])  # the trainer's norm (fp64 sums) and clipping
            torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.grad_clip, norm)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg.optim, steps)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step == 0 or step == steps - 1:
                loss.item()  # the trainer reads the loss on its log steps (the first and the last here)
            if gc_interval and (step + 1) % gc_interval == 0:
                gc.collect(1)
        sync()
        return time.perf_counter() - t_start, time.process_time() - cpu_start


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, lowest, highest)."""
    return statistics.median(values), min(values), max(values)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initializes CUDA: the trainer picks the CPU
    import torch

    from slimpajama_train.backends.base import PRECISIONS, BackendConfig
    from slimpajama_train.callbacks.config import LoggerConfig, WandbConfig
    from slimpajama_train.checkpoint import CheckpointConfig
    from slimpajama_train.config import TrainConfig, TrainerConfig
    from slimpajama_train.data.dataset import DataConfig, open_dataset
    from slimpajama_train.data.loader import to_device_batch, train_loader
    from slimpajama_train.distributed import destroy_distributed, init_distributed
    from slimpajama_train.model import ModelConfig
    from slimpajama_train.optim import OptimConfig
    from slimpajama_train.trainer import Trainer

    cuda = torch.cuda.is_available()
    if a.device == "cuda" and not cuda:
        print("bench_train: --device cuda but no CUDA GPU on this machine; nothing measured")
        print(json.dumps({"skipped": "no CUDA GPU"}))
        return
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    precision = a.precision or ("bf16" if cuda else "fp32")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    data = Path(a.data)
    if a.synthetic:
        write_synthetic_shards(data, vocab_size=a.vocab, seq_len=a.seq_len,
                               train_samples=max(512, 2 * a.steps * a.micro_batch))
    else:
        ensure_demo_shards(data)
    cfg = TrainConfig(
        run_dir=a.run_dir,
        model=ModelConfig(dim=a.dim, n_layers=a.layers, n_heads=max(1, a.dim // 64), tie_embeddings=True),
        data=DataConfig(path=str(data), micro_batch_size=a.micro_batch, num_workers=1),
        optim=OptimConfig(lr=1e-3, warmup_steps=5),
        backend=BackendConfig(name="fsdp2", precision=precision, always_shard=a.always_shard),
        trainer=TrainerConfig(max_steps=a.steps, global_batch_size=a.micro_batch, log_interval=a.steps, eval_interval=0,
                           compile=a.compile),
        checkpoint=CheckpointConfig(interval=0, resume="none", on_existing="overwrite"),
        logger=LoggerConfig(console=False, metrics_file=False, wandb=WandbConfig(enabled=False)),
    )
    dist_info = init_distributed()

    def trainer_run() -> tuple[float, float]:
        nonlocal resolved, n_params, seq
        clock = StepClock(a.warmup, a.steps, sync)
        trainer = Trainer(cfg, dist_info, callbacks=[clock])
        try:
            trainer.fit()
        finally:
            trainer.close()
        resolved, n_params, seq = trainer.cfg, trainer.n_params, trainer.manifest["seq_len"]
        return (a.steps - a.warmup) * trainer.tokens_per_step / (clock.t1 - clock.t0), clock.cpu_s

    resolved, n_params, seq = None, 0, 0
    # The bare loop's batches: the first of the trainer's loader, pre-loaded on the device, reused by every bare run.
    manifest, data_dir = open_dataset(cfg.data)
    it = iter(train_loader(DataConfig(path=str(data), micro_batch_size=a.micro_batch, num_workers=0), manifest,
                           data_dir, 0, a.micro_batch, 0, 1))
    batches = [to_device_batch(next(it), device) for _ in range(a.steps)]
    trainer_tps, bare_tps, trainer_cpu, bare_cpu = [], [], [], []
    for r in range(a.repeats):
        for which in (("trainer", "bare") if r % 2 == 0 else ("bare", "trainer")):
            if which == "trainer":
                tps, cpu_s = trainer_run()
                trainer_tps.append(tps)
                trainer_cpu.append(cpu_s)
            else:  # on the trainer's resolved config (vocabulary, sequence length, compile): pair 1 ran it first
                seconds, cpu_s = bare_loop_seconds(resolved, batches, device, PRECISIONS[precision], a.warmup, sync)
                bare_tps.append((a.steps - a.warmup) * a.micro_batch * seq / seconds)
                bare_cpu.append(cpu_s)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    destroy_distributed()

    ratios = [t / b for t, b in zip(trainer_tps, bare_tps, strict=True)]
    ratio, lo, hi = spread(ratios)
    # On a CPU shared with other work, wall time swings with the machine's load; the CPU time of this
    # process (the trainer's loader workers excluded) is the steadier view of the host work per step.
    cpu_ratios = [b / t for t, b in zip(trainer_cpu, bare_cpu, strict=True)]
    where = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    shape = f"{n_params / 1e6:.1f}M ({a.layers}x{a.dim})"
    wrap = "FSDP2 always_shard" if a.always_shard else "FSDP2 backend"
    print(f"\n{shape}, {a.micro_batch} x {seq} tokens per step, {precision}, {where}, compile "
          f"{'on' if resolved.trainer.compile else 'off'}; {a.steps - a.warmup} steps timed per run")
    print(f"\n| pair | slimpajama trainer ({wrap}, shard loader) tokens/s | bare loop (in-memory batches) tokens/s "
          "| trainer / bare | per CPU second: trainer / bare |\n|---:|---:|---:|---:|---:|")
    for i, (t, b, c) in enumerate(zip(trainer_tps, bare_tps, cpu_ratios, strict=True)):
        print(f"| {i + 1} | {t:,.0f} | {b:,.0f} | {t / b:.3f} | {c:.3f} |")
    print(f"\nratio trainer / bare = {ratio:.3f}, median of {a.repeats} alternating pairs "
          f"(spread {lo:.3f}-{hi:.3f}; target >= 0.95)")
    out = {"trainer_tokens_s": statistics.median(trainer_tps), "bare_loop_tokens_s": statistics.median(bare_tps),
           "ratio": ratio, "ratio_min": lo, "ratio_max": hi, "ratios": ratios, "repeats": a.repeats,
           "trainer_runs_tokens_s": trainer_tps, "bare_runs_tokens_s": bare_tps,
           "steps_timed": a.steps - a.warmup, "params": n_params, "precision": precision,
           "device": where, "micro_batch": a.micro_batch, "seq_len": seq,
           "always_shard": a.always_shard, "compile": bool(resolved.trainer.compile),
           "loss_chunk_tokens": resolved.backend.loss_chunk_tokens, "fused_adamw": resolved.optim.fused}
    if not cuda:  # on a GPU the host's CPU time is mostly spent waiting for the device
        cpu_ratio, cpu_lo, cpu_hi = spread(cpu_ratios)
        print(f"tokens per CPU second of this process, trainer / bare = {cpu_ratio:.3f} "
              f"(spread {cpu_lo:.3f}-{cpu_hi:.3f})")
        out.update(cpu_time_ratio=cpu_ratio, cpu_time_ratio_min=cpu_lo, cpu_time_ratio_max=cpu_hi)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
