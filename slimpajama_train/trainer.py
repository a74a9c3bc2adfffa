"""The training loop. It drives a :class:`Backend` and never asks which one.

Each piece owns one job: the backend shards, steps and saves state; the :class:`Checkpointer`
decides when to save and pulls the run state from here; callbacks observe (console, metrics file,
W&B, speed); :class:`StopRequest` records scheduler signals, which the ranks agree on here.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from data_prep.cli import ConfigError, UserError
from slimpajama_train import __version__
from slimpajama_train.backends import build_backend
from slimpajama_train.backends.hardware import compile_problem
from slimpajama_train.callbacks.base import Callback, ordered
from slimpajama_train.checkpoint import Checkpointer, checkpoint_step, list_checkpoints
from slimpajama_train.config import TrainConfig, config_hash, resolve_config
from slimpajama_train.data.dataset import check_manifest, local_file, open_dataset
from slimpajama_train.data.loader import train_loader, val_loader
from slimpajama_train.data.workers import shut_down_workers, start_workers
from slimpajama_train.distributed import (
    AsyncVote,
    DistInfo,
    all_reduce_sum,
    all_reduce_tensor_,
    set_collective_timeout,
)
from slimpajama_train.log_window import LogWindow, StepRecord
from slimpajama_train.mfu import detect_peak_tflops, flops_per_token, host_peak_rss_bytes, mfu_off_reason
from slimpajama_train.model import Transformer, count_parameters
from slimpajama_train.optim import OptimConfig, lr_at
from slimpajama_train.preemption import StopRequest

PREEMPTED_MARKER = "preempted.json"
# Model fields that only shape the initialization: a resume may change them.
INIT_ONLY_MODEL_KEYS = ("init_std", "init_scaled_residual")
# What the LR at a step depends on: a resume that changes one of them changes the schedule.
SCHEDULE_KEYS = (("trainer", "max_steps"), ("optim", "lr"), ("optim", "schedule"), ("optim", "warmup_steps"),
                 ("optim", "min_lr_ratio"), ("optim", "decay_fraction"))


class TrainingStopped(UserError, RuntimeError):
    """The run cannot go on usefully (steps that keep failing, a suspect checkpoint); the message
    says why and what to do, and nothing good was overwritten."""


def build_model(cfg: TrainConfig) -> Transformer:
    """The model of ``cfg`` without initialized weights (the backend builds it on the meta device or
    under ZeRO-3's partitioning and initializes each rank's part)."""
    model = Transformer(cfg.model, seed=None)
    model.set_activation_checkpointing(cfg.backend.activation_checkpointing, cfg.backend.ac_every)
    model.set_loss_chunk(cfg.backend.loss_chunk_tokens)
    if cfg.trainer.compile:
        model.compile_blocks()  # in place: parameter names (and checkpoints) are unchanged
    return model


def resolve_compile(cfg: TrainConfig, device: torch.device) -> tuple[TrainConfig, str | None]:
    """``trainer.compile`` as the run uses it (None: on for CUDA when it can work there, off on CPU),
    and a log line when the automatic choice had to turn it off."""
    want = cfg.trainer.compile
    if want is False or (want is None and device.type != "cuda"):
        # Off without asking: the check imports TorchInductor (about 1 s of CPU per rank at start-up).
        return replace(cfg, trainer=replace(cfg.trainer, compile=False)), None
    problem = compile_problem(device)
    if want is None:
        on = device.type == "cuda" and problem is None
        note = f"trainer.compile: off ({problem})" if device.type == "cuda" and problem else None
        return replace(cfg, trainer=replace(cfg.trainer, compile=on)), note
    if want and problem:
        raise ConfigError(f"trainer.compile=true: {problem}; set trainer.compile=false")
    return cfg, None


@contextlib.contextmanager
def collector_frozen(gc_interval: int) -> Iterator[None]:
    """With ``gc_interval`` (``trainer.gc_interval``): everything built so far (model, loaders,
    config) leaves the garbage collector's view and automatic collection is off inside, so the loop
    collects only at the steps it chooses, the same on every rank; 0 leaves the collector alone."""
    if not gc_interval:
        yield
        return
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.enable()


def _sample_order(data: dict[str, Any]) -> tuple[Any, str, int | None]:
    """What fixes the training order besides the manifest: (seed, order, K); K only for ``blocks``
    (a checkpoint from before ``data.order`` existed was trained in the global order)."""
    order = data.get("order", "global")
    return data.get("seed"), order, data.get("block_shards") if order == "blocks" else None


class Trainer:
    """Builds model, backend, data and checkpointer from a :class:`TrainConfig` and runs ``callbacks``
    (the entry point builds them: :func:`slimpajama_train.callbacks.build.build_callbacks`);
    :meth:`fit` runs the loop. ``cfg`` is not modified: ``self.cfg`` is the resolved copy."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, callbacks: list[Callback],
                 stop: StopRequest | None = None) -> None:
        self.stop = stop or StopRequest().install()
        self.dist = dist_info
        self.manifest, self.data_dir = open_dataset(cfg.data)
        cfg, compile_note = resolve_compile(resolve_config(cfg, self.manifest, dist_info.world_size),
                                            dist_info.device)
        self.cfg = cfg
        if compile_note:
            self.log(compile_note)
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
                 f"AC {cfg.backend.activation_checkpointing}; loss chunk {cfg.backend.loss_chunk_tokens} tokens; "
                 f"compile {'on' if cfg.trainer.compile else 'off'}; "
                 f"host peak RSS after sharded init {host_peak_rss_bytes() / 2**30:.2f} GiB (rank 0)"
                 + (f"; {layout}" if (layout := self.backend.describe()) else ""))
        self.backend.build_optimizer()

        self.step = 0
        self.samples_consumed = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.preempted = False
        # Resume health: a checkpoint after which no step has a finite loss is suspect (corrupt or
        # diverged weights); the run then stops before saving over, or pruning, anything good.
        self.resumed_from: str | None = None
        self._resumed_step = 0
        self._finite_since_resume = False
        self._last_loss_finite = True
        # Steps since the last log step: their losses and step results stay on the device until then.
        self._window = LogWindow(self.dist.device, self.dist.world_size, self.grad_accum)
        self.summary: dict[str, Any] = {}
        self.callbacks = ordered(callbacks)
        tok = self.manifest["tokenizer"]
        tokenizer = local_file(cfg.data, self.data_dir, tok["file"], tok["sha256"])
        self.checkpointer = Checkpointer(cfg.checkpoint, Path(cfg.checkpoint_dir), self.backend, self,
                                         extra_files=[tokenizer], log=self.log)
        self.checkpointer.resume()
        # Start-up and resume ran under the long init timeout; steps get the short one.
        set_collective_timeout(cfg.dist.step_timeout_s)

        pin = dist_info.device.type == "cuda"  # pinned batches copy to the GPU asynchronously
        self.train_data = train_loader(cfg.data, self.manifest, self.data_dir, self.samples_consumed, G,
                                       dist_info.rank, W, pin_memory=pin)
        self.train_iter = start_workers(self.train_data)  # a worker stuck in its fork is forked again
        self.val_data = (
            val_loader(cfg.data, self.manifest, self.data_dir, cfg.trainer.eval_batches, G, dist_info.rank, W,
                       pin_memory=pin)
            if cfg.trainer.eval_interval else None
        )
        if self.val_data is not None and cfg.data.num_workers:
            # Fork the validation workers now, beside the training ones, before any step. Forked at the
            # first evaluation instead (step eval_interval of a resumed run, which has no step-0
            # evaluation), a worker once hung inside os.fork's after-fork handlers, on a lock another
            # thread of the rank held at that moment, and the rank waited for its batch forever
            # (test_elastic_resume[1-2-zero3], 2 loaded cores). Persistent workers: later iter() calls
            # reuse these processes (prefetched batches are discarded), so no evaluation forks again.
            # The same hang at this first fork (CPython gh-112275) is start_workers' to undo.
            start_workers(self.val_data)

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
    def is_log_step(self, step: int) -> bool:
        """Steps whose train metrics are read from the device, reduced and logged."""
        loop = self.cfg.trainer
        return step % loop.log_interval == 0 or step == 1 or step == loop.max_steps

    def fit(self) -> dict[str, Any]:
        """Train to ``max_steps`` (or ``halt_at_step``, or a stop signal); returns first/last
        losses, the last checkpoint and whether the run was preempted.

        Steps that do not log never wait for the device: losses, gradient norms and skip flags stay
        there until the next log step reads them in one transfer. The only collective a step adds
        to the training's own is the stop vote, asynchronous and read one step later.
        """
        loop = self.cfg.trainer
        end = min(loop.max_steps, loop.halt_at_step or loop.max_steps)
        for cb in self.callbacks:
            cb.on_train_start(self)
        # A signal during model build or resume: stop before training anything (one small collective).
        self.preempted = self._agree_to_stop()
        if self.step == 0 and self.val_data is not None and not self.preempted:
            self._emit({"step": 0, **self.evaluate()})
        vote = AsyncVote()
        carried: dict[str, float] = {}
        with collector_frozen(loop.gc_interval):
            self._window.restart_clock()
            while self.step < end and not self.preempted:
                if vote.pending and vote.result():  # a signal voted at the start of the previous step
                    self.preempted = True
                    break
                vote.start(self.stop.requested)
                for cb in self.callbacks:
                    cb.on_step_start(self)
                metrics = self.train_step()
                t_other = time.perf_counter()
                if loop.gc_interval and self.step % loop.gc_interval == 0:
                    gc.collect(1)  # the same step on every rank: no rank pauses while others wait on it
                if self.val_data is not None and (self.step % loop.eval_interval == 0 or self.step == loop.max_steps):
                    metrics.update(self.evaluate())
                if self.checkpointer.due(self.step):
                    if self._window:
                        metrics.update(self._read_window())  # the checkpoint records the skip count
                    self._refuse_suspect_checkpoint()
                # A step's metrics are written before its checkpoint: a kill right after the save cannot
                # leave a checkpointed step without its record. The save's blocking time is reported
                # with the next record.
                if len(metrics) > 1:
                    self._emit({**metrics, **carried})
                    carried = {}
                carried.update(self.checkpointer.step_end(self.step, poll="loss" in metrics))
                self._window.exclude(time.perf_counter() - t_other)
            if vote.pending and vote.result():
                self.preempted = True
            if self._window:  # steps not logged yet (a stop between log steps): nothing is lost
                self._emit({**self._read_window(), **carried})
            self._refuse_suspect_checkpoint()
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
        """One optimizer step over ``grad_accum`` micro-batches; train metrics on log steps only."""
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.cfg.optim, self.cfg.trainer.max_steps)
        loss_sum: torch.Tensor | None = None
        data_wait = 0.0
        for micro in range(self.grad_accum):
            td = time.perf_counter()
            batch = next(self.train_iter)
            data_wait += time.perf_counter() - td
            loss = self.backend.forward_backward(batch, last_micro=micro == self.grad_accum - 1)
            loss_sum = loss if loss_sum is None else loss_sum + loss
        result = self.backend.step(lr)
        self._window.add(StepRecord(self.step + 1, self.samples_consumed, lr, loss_sum, result),
                         host_s=time.perf_counter() - t0, wait_s=data_wait)
        self.step += 1
        self.samples_consumed += self.cfg.trainer.global_batch_size
        if not self.is_log_step(self.step):
            return {"step": self.step}
        return self._read_window()

    def _read_window(self) -> dict[str, Any]:
        """Read the steps since the last log step (:class:`LogWindow`); log skipped steps; the metrics
        of this step."""
        w = self._window.read()
        for rec, loss, norm, skip in zip(w.records, w.losses, w.grad_norms, w.skipped, strict=True):
            if skip or not math.isfinite(loss):
                self._record_skip(rec.step, rec.batch_start, loss, norm)
            else:
                self.consecutive_skips = 0
            self._finite_since_resume |= math.isfinite(loss)
        last_loss = w.losses[-1]
        self._last_loss_finite = math.isfinite(last_loss)
        # Per rank: host time in train_step and, within it, time waiting for the loader. On GPUs the
        # host blocks on nothing between log steps, so host time is the rank's own CPU work (input,
        # Python, launches, GC): a slow host shows as the max. Gloo on CPU blocks the host in every
        # collective, which evens host times out there; the data wait stays per rank.
        W = self.dist.world_size
        finite = [x for x in w.losses if math.isfinite(x)]
        metrics: dict[str, Any] = {
            "step": self.step, "loss": last_loss, "loss_avg": sum(finite) / len(finite) if finite else float("nan"),
            "lr": w.records[-1].lr, "grad_norm": w.grad_norms[-1], "skipped_steps": self.skipped_steps,
            "tokens_seen": self.samples_consumed * self.manifest["seq_len"], "steps_in_window": len(w.records),
            "step_time_s": w.wall_s, "step_time_max_s": max(w.host_s), "step_time_min_s": min(w.host_s),
            "slowest_rank": max(range(W), key=w.host_s.__getitem__),
            "data_wait_s": sum(w.wait_s) / W, "data_wait_max_s": max(w.wait_s), "data_wait_min_s": min(w.wait_s),
            "slowest_data_rank": max(range(W), key=w.wait_s.__getitem__),
        }
        if w.loss_scale is not None:
            metrics["loss_scale"] = w.loss_scale
        if self._last_loss_finite:
            self.summary.setdefault("first_train_loss", last_loss)
            self.summary["last_train_loss"] = last_loss
        return metrics

    def _record_skip(self, step: int, batch_start: int, loss: float, grad_norm: float) -> None:
        """Count a skipped step and log which samples were in its batch (to find bad data)."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        G = self.cfg.trainer.global_batch_size
        if self.dist.is_main:
            order = self.train_data.dataset.order
            names = [s["name"] for s in self.manifest["splits"]["train"]["shards"]]
            samples = [[names[shard], index] for shard, index in
                       (order.locate(order.sample_id(pos)) for pos in range(batch_start, batch_start + G))]
            record = {"step": step, "loss": loss, "grad_norm": grad_norm,
                      "positions": [batch_start, batch_start + G], "samples": samples}
            path = Path(self.cfg.run_dir) / "skipped_batches.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            self.log(f"step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); update skipped. "
                     f"Batch = global positions [{batch_start}, {batch_start + G}); its samples are in {path}")
        if self.consecutive_skips >= self.cfg.trainer.max_consecutive_skips:
            self._refuse_suspect_checkpoint()
            raise TrainingStopped(
                f"{self.consecutive_skips} consecutive steps had non-finite loss or gradients "
                f"(last: step {step}); "
                f"stopping. Lower optim.lr, check the data listed in {self.cfg.run_dir}/skipped_batches.jsonl, "
                f"or raise trainer.max_consecutive_skips"
            )

    def _refuse_suspect_checkpoint(self) -> None:
        """After a resume, every step so far had a non-finite loss: the checkpoint is suspect. Stop
        (non-zero exit) before a save could replace it or prune the ones before it."""
        if self.resumed_from is None or self._finite_since_resume or self.step <= self._resumed_step:
            return
        older = [p.name for p in list_checkpoints(Path(self.cfg.checkpoint_dir))
                 if checkpoint_step(p) < self._resumed_step]
        raise TrainingStopped(
            f"every step since resuming from {self.resumed_from} (steps {self._resumed_step + 1}-{self.step}) had a "
            f"non-finite loss: that checkpoint is suspect; nothing was saved or pruned. "
            + (f"Resume from an earlier one (resume_from={Path(self.cfg.checkpoint_dir) / older[-1]}) "
               if older else "Start a new run (checkpoint.resume=none with a new run_dir) ")
            + "or check optim.lr and the data")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and perplexity over the fixed holdout batches, overall and per source (where the
        validation shards are single-source), with the target tokens behind each per-source figure."""
        sources: list[str] = self.val_data.dataset.sources
        n = len(sources)
        # Per source (and a last slot for samples of mixed shards): loss sum and sample count, on
        # the device; one all-reduce at the end.
        sums = torch.zeros(2 * (n + 1), dtype=torch.float64, device=self.dist.device)
        for batch, src in self.val_data:
            losses = self.backend.eval_loss(batch).double()
            slot = torch.where(src >= 0, src, n).to(self.dist.device, non_blocking=True)
            sums[: n + 1].index_add_(0, slot, losses)
            sums[n + 1 :].index_add_(0, slot, torch.ones_like(losses))
        total = all_reduce_tensor_(sums).tolist()  # the evaluation's one device-to-host transfer
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
        # Workers ignore the scheduler's SIGTERM, so stop them through the loaders (done event and
        # sentinel) now rather than leave them to the interpreter's exit handler.
        self.train_iter = None
        for loader in (self.train_data, self.val_data):
            if loader is not None:
                shut_down_workers(loader)
        for cb in self.callbacks:
            cb.close()
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
            "loss_finite": self._last_loss_finite,
            "backend_state": self.backend.extra_state(),
            "callbacks": {cb.name: state for cb in self.callbacks if (state := cb.state_dict())},
        }

    def check_resume(self, meta: dict[str, Any]) -> None:
        """Before any tensor is read: refuse a checkpoint of another model shape, backend, tokenizer or
        (unless ``data.allow_change``) dataset; warn when the LR schedule changes."""
        path = meta.get("path", self.cfg.checkpoint.resume)
        saved = meta.get("config", {})
        now = asdict(self.cfg)
        fix = "resume with the checkpoint's values, or start a new run: checkpoint.resume=none and a new run_dir"
        differ = [f"model.{k}={saved['model'][k]} (now {v})" for k, v in now["model"].items()
                  if k not in INIT_ONLY_MODEL_KEYS and k in saved.get("model", {}) and saved["model"][k] != v]
        if differ:
            raise ValueError(f"{path} was trained with {', '.join(differ)}; {fix}")
        if saved.get("backend", {}).get("name", now["backend"]["name"]) != now["backend"]["name"]:
            raise ValueError(f"{path} was written by backend.name={saved['backend']['name']} "
                             f"(now {now['backend']['name']}); {fix}")
        if meta["tokenizer_sha256"] != self.manifest["tokenizer"]["sha256"]:
            raise ValueError(f"{path}: trained with tokenizer {meta['tokenizer_sha256'][:12]}…, but data.path uses "
                             f"{self.manifest['tokenizer']['sha256'][:12]}…")
        old_data, new_data = meta.get("data_manifest_hash"), self.manifest.get("prep_config_hash")
        if old_data != new_data:
            where = (f"{path} was trained on data {old_data} ({saved.get('data', {}).get('path')}), "
                     f"data.path={self.cfg.data.path} is {new_data}")
            if not self.cfg.data.allow_change:
                raise ValueError(f"{where}; resume on the checkpoint's data, or set data.allow_change=true")
            self.log(f"warning: {where} (data.allow_change=true)")
        if "data" in saved and _sample_order(saved["data"]) != _sample_order(now["data"]):
            where = (f"{path} was trained in the sample order data.seed/order/block_shards="
                     f"{'/'.join(map(str, _sample_order(saved['data'])))}, now "
                     f"{'/'.join(map(str, _sample_order(now['data'])))}: its samples consumed would name other "
                     "samples (some read twice, some never)")
            if not self.cfg.data.allow_change:
                raise ValueError(f"{where}; resume with the checkpoint's values, or set data.allow_change=true")
            self.log(f"warning: {where} (data.allow_change=true)")
        changes = [f"{group}.{key} {saved[group][key]} -> {now[group][key]}" for group, key in SCHEDULE_KEYS
                   if key in saved.get(group, {}) and saved[group][key] != now[group][key]]
        if changes:
            step = meta["step"]
            known = OptimConfig.__dataclass_fields__  # a checkpoint of another version may have other keys
            old_optim = OptimConfig(**{k: v for k, v in saved["optim"].items() if k in known})
            before = lr_at(step, old_optim, saved["trainer"]["max_steps"])
            after = lr_at(step, self.cfg.optim, self.cfg.trainer.max_steps)
            self.log(f"warning: this resume changes the LR schedule of {path}: {'; '.join(changes)}. "
                     f"The LR of step {step + 1} is {after:.3g} (the checkpoint's schedule: {before:.3g})")

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        path = meta.get("path", self.cfg.checkpoint.resume)
        if meta["samples_consumed"] % self.cfg.trainer.global_batch_size:
            raise ValueError(f"{path}: {meta['samples_consumed']} samples consumed is not a multiple of "
                             f"trainer.global_batch_size={self.cfg.trainer.global_batch_size}")
        self.step = meta["step"]
        self.resumed_from, self._resumed_step, self._finite_since_resume = str(path), self.step, False
        self.samples_consumed = meta["samples_consumed"]
        self.skipped_steps = meta.get("skipped_steps", 0)
        self.backend.load_extra_state(meta.get("backend_state", {}))
        for cb in self.callbacks:
            if cb.name in meta.get("callbacks", {}):
                cb.load_state_dict(meta["callbacks"][cb.name])
        self.log(f"resumed from {path}: step {self.step}, {self.samples_consumed} samples consumed")
