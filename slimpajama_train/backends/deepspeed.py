"""DeepSpeed ZeRO (stages 1/2/3, optional CPU offload) backend, configured from our typed config."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported

import deepspeed  # noqa: E402

from slimpajama_train.backends.base import Backend, StepResult  # noqa: E402
from slimpajama_train.backends.deepspeed_config import deepspeed_config  # noqa: E402
from slimpajama_train.data.loader import to_device_batch  # noqa: E402
from slimpajama_train.distributed import barrier  # noqa: E402
from slimpajama_train.model import Transformer  # noqa: E402
from slimpajama_train.optim import OptimConfig, build_optimizer, param_groups  # noqa: E402
from slimpajama_train.safe_load import weights_only_loads  # noqa: E402


def _safe_globals() -> list:
    """The only non-tensor classes DeepSpeed's checkpoints hold (found by loading them with the safe
    unpickler); everything else in them is tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


CKPT_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"


def default_workers() -> int:
    """Processes for checkpoint conversion: the CPUs this process may use, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 8))


def to_universal(src: Path, dst: Path, workers: int | None = None) -> None:
    """Convert a ZeRO checkpoint into DeepSpeed's universal (world-size independent) format with
    ``workers`` extract processes (default :func:`default_workers`) and half as many merge processes
    (merging holds every rank's slice of a parameter at once). DeepSpeed's converter runs in a fresh
    interpreter: its process pool forks, which is unsafe from a rank that holds process-group and
    OpenMP threads."""
    import subprocess
    import sys

    workers = workers or default_workers()
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(tmp), "--num_extract_workers", str(workers),
           "--num_merge_workers", str(max(1, workers // 2)), "--inject_missing_state"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {src} to a universal checkpoint failed ({' '.join(cmd)}):\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")
    os.replace(tmp, dst)


class DeepSpeedBackend(Backend):
    """Drives a DeepSpeed engine; gradient accumulation and loss scaling are DeepSpeed's."""

    def build_model(self, make_model: Callable[[], Transformer], seed: int, optim_cfg: OptimConfig, micro_batch: int,
                    grad_accum: int) -> None:
        self.grad_accum = grad_accum
        self.optim_cfg = optim_cfg
        self.ds_config = deepspeed_config(self.cfg, optim_cfg, micro_batch, grad_accum, self.dist.world_size)
        # DeepSpeed reads the local rank from the environment (and asserts it is there). Our process
        # group is already formed, by torchrun's variables or, for a plain single process, as a group
        # of one: tell DeepSpeed the local rank that group uses, so `slimpajama-train backend=zero2`
        # runs without a launcher as it does with FSDP2.
        os.environ.setdefault("LOCAL_RANK", str(self.dist.local_rank))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        if self.cfg.zero_stage == 3:
            # ZeRO-3: every parameter is partitioned as its module is constructed, then gathered one
            # at a time for initialization (rank 0 fills it; the exit re-partitions): no rank ever
            # holds more than its partition plus the largest single parameter.
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config,
                                     remote_device="cpu" if self.cfg.offload_params else None,
                                     pin_memory=self.cfg.offload_params and torch.cuda.is_available()):
                model = make_model()
            model._init_buffers()
            for name, p in model.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if self.dist.rank == 0:
                        model.init_param(name, p, seed)
        else:
            # ZeRO-1/2 replicate the parameters on every rank; built on meta, materialized once.
            with torch.device("meta"):
                model = make_model()
            model.to_empty(device=self.dist.device)
            model.tie_weights()
            model.init_weights(seed)
        self.model = model

    def build_optimizer(self) -> None:
        model, optim_cfg = self.model, self.optim_cfg
        client_optim = None if self.cfg.offload_optimizer else build_optimizer(model, optim_cfg, self.dist.device)
        params = (param_groups(model, optim_cfg.weight_decay, optim_cfg.decay_embeddings)
                  if client_optim is None else None)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=client_optim, model_parameters=params, config=self.ds_config
        )
        self.model, self.optimizer = engine, optimizer

    def forward_backward(self, batch: torch.Tensor, last_micro: bool) -> torch.Tensor:
        engine = self.model
        engine.train()
        loss = engine(*to_device_batch(batch, self.dist.device))
        engine.backward(loss)  # divides by gradient_accumulation_steps itself
        if not last_micro:
            engine.step()  # DeepSpeed counts micro-steps; this is not a boundary, so nothing is applied
        return loss.detach()

    def step(self, lr: float) -> StepResult:
        engine = self.model
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        skipped_before = engine.skipped_steps  # a Python int DeepSpeed keeps: reading it is not a sync
        engine.step()
        # Passed on as DeepSpeed holds them (a tensor or a float); the trainer reads them at log steps.
        norm = engine.get_global_grad_norm()
        scale = engine.optimizer.loss_scale if self.cfg.precision == "fp16" else None
        return StepResult(grad_norm=float("nan") if norm is None else norm,
                          skipped=engine.skipped_steps > skipped_before, loss_scale=scale)

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        inputs, targets = to_device_batch(batch, self.dist.device)
        return self.model(inputs, targets, per_sample=True)

    def close(self) -> None:
        # ZeRO-3 keeps module hooks and prefetch state; tearing them down before the process group
        # is destroyed avoids an abort in a background thread at interpreter exit.
        if self.model is not None:
            self.model.destroy()

    def _save(self, path: Path) -> None:
        self.model.save_checkpoint(str(path), tag=CKPT_TAG, save_latest=False)

    def _load(self, path: Path) -> None:
        tag = CKPT_TAG
        saved_world = len(list((path / CKPT_TAG).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))
        if saved_world and saved_world != self.dist.world_size:
            # Elastic resume: DeepSpeed's universal checkpoint re-partitions the fp32 weights and
            # optimizer state for this world size. Converted once, by rank 0, next to the original.
            tag = UNIVERSAL_TAG
            if self.dist.rank == 0 and not (path / UNIVERSAL_TAG / "zero").is_dir():
                to_universal(path / CKPT_TAG, path / UNIVERSAL_TAG)
            barrier()
            self.model._config.load_universal_checkpoint = True
        # Two flaws of DeepSpeed's ZeRO-3 universal load are undone after it: it copies the
        # hyperparameters of param group 0 into every group (giving the no-decay group weight decay),
        # and it gives every group the same `step` tensor, which Adam then increments once per group
        # and step, so later groups get the wrong bias correction.
        hypers = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        with weights_only_loads(_safe_globals()):
            load_path, _ = self.model.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
        self.model._config.load_universal_checkpoint = False
        for group, saved in zip(self.optimizer.param_groups, hypers, strict=True):
            group.update(saved)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        if load_path is None:
            raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint (tag {tag!r}) to load")


def consolidated_state_dict(state_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from a ZeRO checkpoint written by :meth:`DeepSpeedBackend.save`
    (any stage and world size), for generation and export in one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads(_safe_globals()):
        return get_fp32_state_dict_from_zero_checkpoint(str(state_dir), tag=CKPT_TAG)
