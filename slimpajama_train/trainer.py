"""The training loop. It drives a :class:`Backend` and never asks which one.

Each piece owns one job: the backend shards, steps and saves state; the :class:`Checkpointer`
decides when to save and pulls the run state from here; callbacks observe (console, metrics file,
W&B, speed); :class:`StopRequest` records scheduler signals, which the ranks agree on here.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from slimpajama_train import __version__
from slimpajama_train.backends import build_backend
from slimpajama_train.backends.hardware import compile_problem
from slimpajama_train.callbacks.base import Callback, ordered
from slimpajama_train.callbacks.build import build_callbacks
from slimpajama_train.checkpoint import Checkpointer
from slimpajama_train.config import TrainConfig, config_hash, resolve_config
from slimpajama_train.data import check_manifest, open_dataset, train_loader, val_loader
from slimpajama_train.distributed import DistInfo, all_reduce_sum, set_collective_timeout
from slimpajama_train.metrics import detect_peak_tflops, flops_per_token, host_peak_rss_bytes, mfu_off_reason
from slimpajama_train.model import Transformer, count_parameters
from slimpajama_train.optim import lr_at
from slimpajama_train.preemption import StopRequest

PREEMPTED_MARKER = "preempted.json"


def build_model(cfg: TrainConfig) -> Transformer:
    """The model of ``cfg`` without initialized weights (the backend builds it on the meta device or
    under ZeRO-3's partitioning and initializes each rank's part)."""
    model = Transformer(cfg.model, seed=None)
    model.set_activation_checkpointing(cfg.backend.activation_checkpointing, cfg.backend.ac_every)
    if cfg.trainer.compile:
        for block in model.layers:
            block.compile()  # in place: parameter names (and checkpoints) are unchanged
    return model


class Trainer:
    """Builds model, backend, data, checkpointer and callbacks from a :class:`TrainConfig`;
    :meth:`fit` runs the loop. ``cfg`` is not modified: ``self.cfg`` is the resolved copy."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, callbacks: list[Callback] | None = None,
                 stop: StopRequest | None = None) -> None:
        self.stop = stop or StopRequest().install()
        self.dist = dist_info
        self.manifest, self.data_dir = open_dataset(cfg.data)
        self.cfg = cfg = resolve_config(cfg, self.manifest, dist_info.world_size)
        if cfg.trainer.compile and (problem := compile_problem(dist_info.device)):
            raise RuntimeError(f"trainer.compile=true: {problem}; set trainer.compile=false")
        self.config_hash = config_hash(cfg)
        check_manifest(self.manifest, self.data_dir, cfg.model.max_seq_len, cfg.model.vocab_size,
                       cfg.data.tokenizer_sha256)
        seq_len = self.manifest["seq_len"]
        G, B, W = cfg.trainer.global_batch_size, cfg.data.micro_batch_size, dist_info.world_size
        self.grad_accum = G // (B * W)
        self.tokens_per_step = G * seq_len
        self.flops_per_token = flops_per_token(cfg.model, seq_len)
        peak = cfg.trainer.peak_tflops or detect_peak_tflops(dist_info.device)
        self.peak_flops = peak * 1e12 if peak else None
        if not peak and (reason := mfu_off_reason(dist_info.device)):
            self.log(reason)
        self._write_resolved_config()

        torch.manual_seed(cfg.seed)
        self.backend = build_backend(cfg.backend, dist_info)
        self.backend.build_model(lambda: build_model(cfg), cfg.seed, cfg.optim, B, self.grad_accum)
        self.n_params = count_parameters(self.backend.model)
        zero = "" if cfg.backend.name == "fsdp2" else f" ZeRO-{cfg.backend.zero_stage}"
        self.log(f"model: {self.n_params / 1e6:.2f}M parameters, {self.flops_per_token / 1e6:.1f} MFLOPs/token "
                 f"({cfg.model.n_layers} layers, dim {cfg.model.dim}, vocab {cfg.model.vocab_size}, seq {seq_len}); "
                 f"backend {cfg.backend.name}{zero} {cfg.backend.precision}; world {W}; "
                 f"global batch {G} = {B} micro x {self.grad_accum} accum x {W} ranks; "
                 f"host peak RSS after sharded init {host_peak_rss_bytes() / 2**30:.2f} GiB (rank 0)")
        self.backend.build_optimizer()

        self.step = 0
        self.samples_consumed = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.data_wait_s = 0.0
        self.preempted = False
        self.summary: dict[str, Any] = {}
        self.callbacks = ordered(callbacks if callbacks is not None else build_callbacks(cfg.logger, dist_info.is_main))
        tokenizer = self.data_dir / self.manifest["tokenizer"]["file"]
        self.checkpointer = Checkpointer(cfg.checkpoint, Path(cfg.checkpoint_dir), self.backend, self,
                                         extra_files=[tokenizer], log=self.log)
        self.checkpointer.resume()
        # Start-up and resume ran under the long init timeout; steps get the short one.
        set_collective_timeout(cfg.dist.step_timeout_s)

        self.train_data = train_loader(cfg.data, self.manifest, self.data_dir, self.samples_consumed, G,
                                       dist_info.rank, W)
        self.train_iter = iter(self.train_data)
        self.val_data = (
            val_loader(cfg.data, self.manifest, self.data_dir, cfg.trainer.eval_batches, G, dist_info.rank, W)
            if cfg.trainer.eval_interval else None
        )

    def _write_resolved_config(self) -> None:
        if not self.dist.is_main:
            return
        path = Path(self.cfg.run_dir) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"config_hash": self.config_hash, "config": asdict(self.cfg)}, indent=1,
                                   default=str))
        self.log(f"config (resolved, hash {self.config_hash}): {path}")

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, file=sys.stderr, flush=True)

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``max_steps`` (or ``halt_at_step``, or a stop signal); returns first/last
        losses, the last checkpoint and whether the run was preempted."""
        loop = self.cfg.trainer
        end = min(loop.max_steps, loop.halt_at_step or loop.max_steps)
        for cb in self.callbacks:
            cb.on_train_start(self)
        # A signal during model build or resume: stop before training anything (one small collective).
        self.preempted = self._agree_to_stop()
        if self.step == 0 and self.val_data is not None and not self.preempted:
            self._emit({"step": 0, **self.evaluate()})
        carried: dict[str, float] = {}
        while self.step < end and not self.preempted:
            for cb in self.callbacks:
                cb.on_step_start(self)
            metrics = self.train_step()
            if self.val_data is not None and (self.step % loop.eval_interval == 0 or self.step == loop.max_steps):
                metrics.update(self.evaluate())
            # A step's metrics are written before its checkpoint: a kill right after the save cannot
            # leave a checkpointed step without its record. The save's blocking time is reported
            # with the next step.
            self._emit({**metrics, **carried})
            carried = {} if self.preempted else self.checkpointer.step_end(self.step)
        if self.preempted:
            self.log(f"stop requested ({self.stop.describe()} on some rank): saving at step {self.step} "
                     "and exiting for requeue")
        t0 = time.perf_counter()
        self.checkpointer.finish(self.step)
        if self.preempted and self.stop.received_at is not None:
            self.log(f"saved in {time.perf_counter() - t0:.1f} s, {time.monotonic() - self.stop.received_at:.1f} s "
                     f"after the signal (SLURM sends SIGKILL after KillWait, 30 s by default)")
        last = self.checkpointer.last_checkpoint
        self.summary.update(checkpoint=str(last) if last else None, step=self.step, preempted=self.preempted)
        marker = Path(self.cfg.run_dir) / PREEMPTED_MARKER
        if self.dist.is_main:
            if self.preempted:  # tells a launcher (which may only see torchrun's exit code) to requeue
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps({"step": self.step, "checkpoint": self.summary["checkpoint"]}) + "\n")
            else:
                marker.unlink(missing_ok=True)
        for cb in self.callbacks:  # after the save and the marker: an observer cannot cost a checkpoint
            cb.on_train_end(self)
        return self.summary

    def _agree_to_stop(self) -> bool:
        return all_reduce_sum([float(self.stop.requested)], self.dist.device)[0] > 0

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; train metrics on log steps."""
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
        # The skip decision must be global, and the step already synchronized on the gradient norm.
        # A pending stop signal rides on the same collective: every rank stops after the same step.
        loss_total, wait_total, stop_votes = all_reduce_sum(
            [loss_sum.item(), data_wait, float(self.stop.requested)], self.dist.device)
        self.preempted = stop_votes > 0
        self.data_wait_s = wait_total / self.dist.world_size
        loss = loss_total / (self.grad_accum * self.dist.world_size)
        if result.skipped or not math.isfinite(loss):
            self._record_skip(batch_start, loss, result.grad_norm)
        else:
            self.consecutive_skips = 0
        metrics: dict[str, Any] = {"step": self.step}
        if self.step % self.cfg.trainer.log_interval == 0 or self.step == 1 or self.step == self.cfg.trainer.max_steps:
            metrics.update(loss=loss, lr=lr, grad_norm=result.grad_norm, skipped_steps=self.skipped_steps,
                           tokens_seen=self.samples_consumed * self.manifest["seq_len"])
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
                f"{self.consecutive_skips} consecutive steps had non-finite loss or gradients "
                f"(last: step {self.step}); "
                f"stopping. Lower optim.lr, check the data listed in {self.cfg.run_dir}/skipped_batches.jsonl, "
                f"or raise trainer.max_consecutive_skips"
            )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and perplexity over the fixed holdout batches, overall and per source (where the
        validation shards are single-source), with the target tokens behind each per-source figure."""
        sources: list[str] = self.val_data.dataset.sources
        n = len(sources)
        # Per source (and a last slot for samples of mixed shards): loss sum and sample count, on
        # the device; one all-reduce at the end.
        sums = torch.zeros(2 * (n + 1), dtype=torch.float64, device=self.dist.device)
        for inputs, targets, src in self.val_data:
            losses = self.backend.eval_loss(inputs, targets).double()
            slot = torch.where(src >= 0, src, n).to(self.dist.device)
            sums[: n + 1].index_add_(0, slot, losses)
            sums[n + 1 :].index_add_(0, slot, torch.ones_like(losses))
        total = all_reduce_sum(sums.tolist(), self.dist.device)
        loss, count = total[: n + 1], total[n + 1 :]
        val = sum(loss) / sum(count)
        self.summary.setdefault("first_val_loss", val)
        self.summary["last_val_loss"] = val
        out = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        tokens_per_sample = int(self.manifest["seq_len"])
        for k, name in enumerate(sources):
            if count[k]:
                out[f"val_loss/{name}"] = loss[k] / count[k]
                out[f"val_ppl/{name}"] = math.exp(min(loss[k] / count[k], 50.0))
                out[f"val_tokens/{name}"] = int(count[k]) * tokens_per_sample
        return out

    def _emit(self, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_step_end(self, metrics)

    def close(self) -> None:
        """Stop the loader workers and release the backend (before the process group goes away)."""
        it, self.train_iter = self.train_iter, None
        # Workers ignore the scheduler's SIGTERM, so stop them through the loader (done event and
        # sentinel) now rather than leave them to the interpreter's exit handler.
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.backend.close()

    # ---- the run state the checkpointer pulls ---------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.samples_consumed * self.manifest["seq_len"],
            "samples_consumed": self.samples_consumed,
            "global_batch_size": self.cfg.trainer.global_batch_size,
            "config": asdict(self.cfg),
            "config_hash": self.config_hash,
            "data_manifest_hash": self.manifest.get("prep_config_hash"),
            "tokenizer_sha256": self.manifest["tokenizer"]["sha256"],
            "code_version": __version__,
            "skipped_steps": self.skipped_steps,
            "backend_state": self.backend.extra_state(),
            "callbacks": {cb.name: state for cb in self.callbacks if (state := cb.state_dict())},
        }

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        path = meta.get("path", self.cfg.checkpoint.resume)
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
        for cb in self.callbacks:
            if cb.name in meta.get("callbacks", {}):
                cb.load_state_dict(meta["callbacks"][cb.name])
        self.log(f"resumed from {path}: step {self.step}, {self.samples_consumed} samples consumed")
