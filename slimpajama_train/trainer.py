"""The training loop. It drives a :class:`Backend` and never asks which one."""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from slimpajama_train import __version__
from slimpajama_train.backends import build_backend
from slimpajama_train.callbacks import Callback, build_callbacks
from slimpajama_train.checkpoint import CheckpointManager
from slimpajama_train.config import TrainConfig
from slimpajama_train.data import check_manifest, open_dataset, train_loader, val_loader
from slimpajama_train.distributed import DistInfo, all_reduce_sum
from slimpajama_train.model import ModelConfig, Transformer, count_parameters
from slimpajama_train.optim import lr_at


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
        G, B, W = cfg.trainer.global_batch_size, cfg.data.micro_batch_size, dist_info.world_size
        if G % (B * W):
            raise ValueError(
                f"trainer.global_batch_size={G} must be a multiple of data.micro_batch_size={B} x world size {W}"
            )
        self.grad_accum = G // (B * W)
        self.tokens_per_step = G * self.manifest["seq_len"]

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and world size
        model = Transformer(cfg.model)
        self.n_params = count_parameters(model)
        self.log(f"model: {self.n_params / 1e6:.2f}M parameters ({cfg.model.n_layers} layers, dim {cfg.model.dim}, "
                 f"vocab {cfg.model.vocab_size}, seq {cfg.model.max_seq_len}); backend {cfg.backend.name} "
                 f"{cfg.backend.precision}; world {W}; global batch {G} = {B} micro x {self.grad_accum} accum x {W} ranks")
        self.backend = build_backend(cfg.backend, dist_info)
        self.backend.setup(model, cfg.optim)

        self.ckpt = CheckpointManager(cfg.checkpoint, Path(cfg.checkpoint_dir))
        self.step = 0
        self.samples_consumed = 0
        self.last_saved_step: int | None = None
        self.last_checkpoint: Path | None = None
        self.wandb_run_id = cfg.logger.wandb.id
        resume = self.ckpt.resume_path()
        if resume is not None:
            self._resume(resume)
        if self.wandb_run_id is None:
            self.wandb_run_id = uuid.uuid4().hex[:12]

        self.train_iter = iter(train_loader(cfg.data, self.manifest, self.data_dir, self.samples_consumed, G, dist_info.rank, W))
        self.val_data = (
            val_loader(cfg.data, self.manifest, self.data_dir, cfg.trainer.eval_batches, dist_info.rank, W)
            if cfg.trainer.eval_interval else None
        )
        self.callbacks = callbacks if callbacks is not None else build_callbacks(cfg.logger, dist_info.is_main)
        self.summary: dict[str, Any] = {}

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, file=sys.stderr, flush=True)

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``max_steps`` (or ``halt_at_step``); returns first/last losses and the last checkpoint."""
        loop = self.cfg.trainer
        end = min(loop.max_steps, loop.halt_at_step or loop.max_steps)
        for cb in self.callbacks:
            cb.on_train_start(self)
        if self.step == 0 and self.val_data is not None:
            self._emit({"step": 0, **self.evaluate()})
        while self.step < end:
            metrics = self.train_step()
            if self.val_data is not None and (self.step % loop.eval_interval == 0 or self.step == loop.max_steps):
                metrics.update(self.evaluate())
            self._emit(metrics)
        for cb in self.callbacks:
            cb.on_train_end(self)
        self.summary["checkpoint"] = str(self.last_checkpoint) if self.last_checkpoint else None
        self.summary["step"] = self.step
        return self.summary

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
            last = micro == self.grad_accum - 1
            loss_sum += self.backend.forward_backward(inputs, targets, 1.0 / self.grad_accum, sync_grads=last)
        grad_norm = self.backend.step(lr, self.cfg.optim.grad_clip)
        self.step += 1
        self.samples_consumed += self.cfg.trainer.global_batch_size
        metrics: dict[str, Any] = {"step": self.step}
        if self.step % self.cfg.trainer.log_interval == 0 or self.step == 1 or self.step == self.cfg.trainer.max_steps:
            loss_total, wait_total = all_reduce_sum([loss_sum.item(), data_wait], self.dist.device)
            dt = time.perf_counter() - t0
            metrics.update(
                loss=loss_total / (self.grad_accum * self.dist.world_size),
                lr=lr,
                grad_norm=grad_norm,
                tokens_per_s=self.tokens_per_step / dt,
                data_wait_s=wait_total / self.dist.world_size,
                step_time_s=dt,
                tokens_seen=self.samples_consumed * self.manifest["seq_len"],
            )
            self.summary.setdefault("first_train_loss", metrics["loss"])
            self.summary["last_train_loss"] = metrics["loss"]
        return metrics

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
    def save_checkpoint(self) -> Path:
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
        }
        tokenizer = self.data_dir / self.manifest["tokenizer"]["file"]
        path = self.ckpt.save(self.step, self.backend, meta, extra_files=[tokenizer])
        self.last_saved_step, self.last_checkpoint = self.step, path
        self.log(f"checkpoint: {path}")
        return path

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
        self.last_saved_step, self.last_checkpoint = self.step, Path(path)
        self.wandb_run_id = self.cfg.logger.wandb.id or meta.get("wandb_run_id")
        self.log(f"resumed from {path}: step {self.step}, {self.samples_consumed} samples consumed")
