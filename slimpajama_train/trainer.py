"""The training loop. It drives a :class:`Backend` and never asks which one."""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from slimpajama_train import __version__
from slimpajama_train.backends import build_backend
from slimpajama_train.callbacks import Callback, build_callbacks
from slimpajama_train.checkpoint import CheckpointManager, step_dirname
from slimpajama_train.config import TrainConfig
from slimpajama_train.data import check_manifest, open_dataset, train_loader, val_loader
from slimpajama_train.distributed import DistInfo, all_reduce_sum
from slimpajama_train.metrics import detect_peak_tflops, peak_memory_gb
from slimpajama_train.model import ModelConfig, Transformer, count_parameters, flops_per_token
from slimpajama_train.optim import lr_at


PREEMPTED_MARKER = "preempted.json"
WANDB_ID_FILE = "wandb_run_id"


def resolve_model_config(model: ModelConfig, manifest: dict[str, Any]) -> ModelConfig:
    """Fill ``vocab_size`` and ``max_seq_len`` from the data manifest where the config leaves them unset."""
    return replace(
        model,
        vocab_size=model.vocab_size or manifest["tokenizer"]["vocab_size"],
        max_seq_len=model.max_seq_len or manifest["seq_len"],
    )


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


class Trainer:
    """Builds model, backend, data and callbacks from a :class:`TrainConfig`; :meth:`fit` runs the loop."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, callbacks: list[Callback] | None = None) -> None:
        self.cfg = cfg
        self.dist = dist_info
        self.manifest, self.data_dir = open_dataset(cfg.data)
        cfg.model = resolve_model_config(cfg.model, self.manifest)
        check_manifest(self.manifest, self.data_dir, cfg.model.max_seq_len, cfg.model.vocab_size, cfg.data.tokenizer_sha256)
        seq_len = self.manifest["seq_len"]
        if cfg.trainer.global_batch_tokens is not None:
            if cfg.trainer.global_batch_tokens % seq_len:
                raise ValueError(f"trainer.global_batch_tokens={cfg.trainer.global_batch_tokens} is not a multiple of the data's seq_len {seq_len}")
            cfg.trainer.global_batch_size = cfg.trainer.global_batch_tokens // seq_len
        G, B, W = cfg.trainer.global_batch_size, cfg.data.micro_batch_size, dist_info.world_size
        if G % (B * W):
            raise ValueError(
                f"global batch of {G} samples (trainer.global_batch_size / global_batch_tokens) must be a multiple "
                f"of data.micro_batch_size={B} x world size {W}"
            )
        self.grad_accum = G // (B * W)
        self.tokens_per_step = G * seq_len
        self.flops_per_token = flops_per_token(cfg.model, seq_len)
        peak = cfg.trainer.peak_tflops or detect_peak_tflops(dist_info.device)
        self.peak_flops = peak * 1e12 if peak else None

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and world size
        model = Transformer(cfg.model)
        model.set_activation_checkpointing(cfg.backend.activation_checkpointing, cfg.backend.ac_every)
        if cfg.trainer.compile:
            for block in model.layers:
                block.compile()  # in place: parameter names (and checkpoints) are unchanged
        self.n_params = count_parameters(model)
        self.log(f"model: {self.n_params / 1e6:.2f}M parameters, {self.flops_per_token / 1e6:.1f} MFLOPs/token "
                 f"({cfg.model.n_layers} layers, dim {cfg.model.dim}, vocab {cfg.model.vocab_size}, seq {seq_len}); "
                 f"backend {cfg.backend.name}{'' if cfg.backend.name == 'fsdp2' else f' ZeRO-{cfg.backend.zero_stage}'} "
                 f"{cfg.backend.precision}; world {W}; global batch {G} = {B} micro x {self.grad_accum} accum x {W} ranks")
        self.backend = build_backend(cfg.backend, dist_info)
        self.backend.setup(model, cfg.optim, B, self.grad_accum)

        self.ckpt = CheckpointManager(cfg.checkpoint, Path(cfg.checkpoint_dir))
        self.step = 0
        self.samples_consumed = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._signal_received = False
        self.preempted = False
        self.last_saved_step: int | None = None
        self.last_checkpoint: Path | None = None
        self.wandb_run_id = cfg.logger.wandb.id
        resume = self.ckpt.resume_path()
        if resume is not None:
            self._resume(resume)
        if self.wandb_run_id is None:
            self.wandb_run_id = self._run_dir_wandb_id()

        self.train_data = train_loader(cfg.data, self.manifest, self.data_dir, self.samples_consumed, G, dist_info.rank, W)
        self.train_iter = iter(self.train_data)
        self.val_data = (
            val_loader(cfg.data, self.manifest, self.data_dir, cfg.trainer.eval_batches, G, dist_info.rank, W)
            if cfg.trainer.eval_interval else None
        )
        self.callbacks = callbacks if callbacks is not None else build_callbacks(cfg.logger, dist_info.is_main)
        self.summary: dict[str, Any] = {}

    def _run_dir_wandb_id(self) -> str:
        """The W&B run id kept in ``run_dir`` for runs without a checkpoint yet, so that a job
        requeued before its first save still continues the same W&B run."""
        path = Path(self.cfg.run_dir) / WANDB_ID_FILE
        if path.is_file():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:12]
        if self.dist.is_main:  # only the main rank logs to W&B
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(run_id + "\n")
            os.replace(tmp, path)
        return run_id

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, file=sys.stderr, flush=True)

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``max_steps`` (or ``halt_at_step``, or a preemption signal); returns first/last
        losses, the last checkpoint and whether the run was preempted."""
        loop = self.cfg.trainer
        end = min(loop.max_steps, loop.halt_at_step or loop.max_steps)
        self._install_signal_handlers()
        for cb in self.callbacks:
            cb.on_train_start(self)
        if self.step == 0 and self.val_data is not None:
            self._emit({"step": 0, **self.evaluate()})
        while self.step < end and not self.preempted:
            metrics = self.train_step()
            if self.val_data is not None and (self.step % loop.eval_interval == 0 or self.step == loop.max_steps):
                metrics.update(self.evaluate())
            self._emit(metrics)
        if self.preempted:
            self.log(f"preemption signal received: saving at step {self.step} and exiting for requeue")
        for cb in self.callbacks:
            cb.on_train_end(self)  # the checkpoint callback saves here if this step is not saved yet
        self.summary.update(checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
                            step=self.step, preempted=self.preempted)
        marker = Path(self.cfg.run_dir) / PREEMPTED_MARKER
        if self.dist.is_main:
            if self.preempted:  # tells a launcher (which may only see torchrun's exit code) to requeue
                marker.write_text(json.dumps({"step": self.step, "checkpoint": self.summary["checkpoint"]}) + "\n")
            else:
                marker.unlink(missing_ok=True)
        return self.summary

    def _install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (what SLURM sends ahead of a time limit or on preemption) ask for a stop;
        the ranks agree on it at the end of the step (see :meth:`train_step`)."""
        self._signal_received = False
        self.preempted = False

        def request_stop(signum, frame) -> None:
            self._signal_received = True

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, request_stop)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; metrics on log steps."""
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.cfg.optim, self.cfg.trainer.max_steps)
        loss_sum = torch.zeros((), device=self.dist.device)
        data_wait = 0.0
        for micro in range(self.grad_accum):
            td = time.perf_counter()
            inputs, targets = next(self.train_iter)
            data_wait += time.perf_counter() - td
            loss_sum += self.backend.forward_backward(inputs, targets, last_micro=micro == self.grad_accum - 1)
        result = self.backend.step(lr)
        batch_start = self.samples_consumed
        self.step += 1
        self.samples_consumed += self.cfg.trainer.global_batch_size
        # The loss is reduced every step: the skip decision must be global, and the step already
        # synchronized on the gradient norm, so this adds no stall.
        # A pending stop signal rides on the same collective: every rank stops after the same step.
        loss_total, wait_total, stop_votes = all_reduce_sum(
            [loss_sum.item(), data_wait, float(self._signal_received)], self.dist.device)
        self.preempted = stop_votes > 0
        loss = loss_total / (self.grad_accum * self.dist.world_size)
        if result.skipped or not math.isfinite(loss):
            self._record_skip(batch_start, loss, result.grad_norm)
        else:
            self.consecutive_skips = 0
        metrics: dict[str, Any] = {"step": self.step}
        if self.step % self.cfg.trainer.log_interval == 0 or self.step == 1 or self.step == self.cfg.trainer.max_steps:
            dt = time.perf_counter() - t0
            tps = self.tokens_per_step / dt
            metrics.update(
                loss=loss, lr=lr, grad_norm=result.grad_norm,
                tokens_per_s=tps, tokens_per_s_per_device=tps / self.dist.world_size,
                data_wait_s=wait_total / self.dist.world_size, step_time_s=dt,
                tokens_seen=self.samples_consumed * self.manifest["seq_len"],
                peak_mem_gb=peak_memory_gb(self.dist.device), skipped_steps=self.skipped_steps,
            )
            if self.peak_flops:
                metrics["mfu"] = tps / self.dist.world_size * self.flops_per_token / self.peak_flops
            if result.loss_scale is not None:
                metrics["loss_scale"] = result.loss_scale
            if math.isfinite(loss):
                self.summary.setdefault("first_train_loss", loss)
                self.summary["last_train_loss"] = loss
        return metrics

    def _record_skip(self, batch_start: int, loss: float, grad_norm: float) -> None:
        """Count a skipped step and log which samples were in its batch (to find bad data)."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        G = self.cfg.trainer.global_batch_size
        if self.dist.is_main:
            order = self.train_data.dataset.order
            names = [s["name"] for s in self.manifest["splits"]["train"]["shards"]]
            samples = [[names[shard], index] for shard, index in
                       (order.locate(order.sample_id(pos)) for pos in range(batch_start, batch_start + G))]
            record = {"step": self.step, "loss": loss, "grad_norm": grad_norm,
                      "positions": [batch_start, batch_start + G], "samples": samples}
            path = Path(self.cfg.run_dir) / "skipped_batches.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            self.log(f"step {self.step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); update skipped. "
                     f"Batch = global positions [{batch_start}, {batch_start + G}); its samples are in {path}")
        if self.consecutive_skips >= self.cfg.trainer.max_consecutive_skips:
            raise RuntimeError(
                f"{self.consecutive_skips} consecutive steps had non-finite loss or gradients (last: step {self.step}); "
                f"stopping. Lower optim.lr, check the data listed in {self.cfg.run_dir}/skipped_batches.jsonl, "
                f"or raise trainer.max_consecutive_skips"
            )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and perplexity over the fixed holdout batches."""
        total, count = 0.0, 0
        for inputs, targets in self.val_data:
            total += self.backend.eval_loss(inputs, targets).item()
            count += 1
        total, count = all_reduce_sum([total, float(count)], self.dist.device)
        val = total / count
        self.summary.setdefault("first_val_loss", val)
        self.summary["last_val_loss"] = val
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    def _emit(self, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_step_end(self, metrics)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> float:
        """Checkpoint this step (collective); returns the seconds training was blocked."""
        meta = {
            "tokens_seen": self.samples_consumed * self.manifest["seq_len"],
            "samples_consumed": self.samples_consumed,
            "global_batch_size": self.cfg.trainer.global_batch_size,
            "wandb_run_id": self.wandb_run_id,
            "config": asdict(self.cfg),
            "config_hash": config_hash(self.cfg),
            "data_manifest_hash": self.manifest.get("prep_config_hash"),
            "tokenizer_sha256": self.manifest["tokenizer"]["sha256"],
            "code_version": __version__,
            "skipped_steps": self.skipped_steps,
            "backend_state": self.backend.extra_state(),
        }
        tokenizer = self.data_dir / self.manifest["tokenizer"]["file"]
        blocked = self.ckpt.save(self.step, self.backend, meta, extra_files=[tokenizer])
        self.last_saved_step = self.step
        if self.ckpt.pending is None:
            self.last_checkpoint = self.ckpt.root / step_dirname(self.step)
            self.log(f"checkpoint: {self.last_checkpoint} (blocked {blocked:.2f} s)")
        else:
            self.log(f"checkpoint: step {self.step} writing in the background (blocked {blocked:.2f} s)")
        return blocked

    def poll_checkpoint(self) -> None:
        """Finalize a background checkpoint once every rank has written it (collective)."""
        if (path := self.ckpt.poll()) is not None:
            self.last_checkpoint = path
            self.log(f"checkpoint: {path}")

    def wait_checkpoint(self) -> None:
        if (path := self.ckpt.wait()) is not None:
            self.last_checkpoint = path
            self.log(f"checkpoint: {path}")

    def _resume(self, path: Path) -> None:
        meta = self.ckpt.load(path, self.backend)
        if meta["tokenizer_sha256"] != self.manifest["tokenizer"]["sha256"]:
            raise ValueError(f"{path}: trained with tokenizer {meta['tokenizer_sha256'][:12]}…, but data.path uses "
                             f"{self.manifest['tokenizer']['sha256'][:12]}…")
        if meta["samples_consumed"] % self.cfg.trainer.global_batch_size:
            raise ValueError(f"{path}: {meta['samples_consumed']} samples consumed is not a multiple of "
                             f"trainer.global_batch_size={self.cfg.trainer.global_batch_size}")
        self.step = meta["step"]
        self.samples_consumed = meta["samples_consumed"]
        self.skipped_steps = meta.get("skipped_steps", 0)
        self.backend.load_extra_state(meta.get("backend_state", {}))
        self.last_saved_step, self.last_checkpoint = self.step, Path(path)
        self.wandb_run_id = self.cfg.logger.wandb.id or meta.get("wandb_run_id")
        self.log(f"resumed from {path}: step {self.step}, {self.samples_consumed} samples consumed")
