"""DeepSpeed ZeRO (stages 1/2/3, optional CPU offload) backend, configured from our typed config."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported

import deepspeed  # noqa: E402

from slimpajama_train.backends.base import Backend, BackendConfig, StepResult  # noqa: E402
from slimpajama_train.checkpoint import weights_only_loads  # noqa: E402
from slimpajama_train.model import Transformer, lm_loss  # noqa: E402
from slimpajama_train.optim import OptimConfig, build_optimizer, param_groups  # noqa: E402

def _safe_globals() -> list:
    """The only non-tensor classes DeepSpeed's checkpoints hold (found by loading them with the safe
    unpickler); everything else in them is tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


# Keys whose values the trainer derives; a user JSON may repeat them only with the same value.
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
CKPT_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"


def to_universal(src: Path, dst: Path) -> None:
    """Convert a ZeRO checkpoint into DeepSpeed's universal (world-size independent) format."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    os.replace(tmp, dst)


def deepspeed_config(cfg: BackendConfig, optim: OptimConfig, micro_batch: int, grad_accum: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, so batch sizes, precision and clipping agree with the trainer's."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "overlap_comm": torch.cuda.is_available(), "contiguous_gradients": True}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds: dict[str, Any] = {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16", "check_grad_overflow": True},
        "fp16": {
            "enabled": cfg.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": int(round(torch.log2(torch.tensor(cfg.initial_loss_scale)).item())),
            "loss_scale_window": cfg.loss_scale_window,
            "hysteresis": 1,
            "min_loss_scale": 1,
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        # DeepSpeed's vectorized CPU Adam, built from this section with our weight-decay groups.
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": optim.lr, "betas": [optim.beta1, optim.beta2],
                                                       "eps": optim.eps, "weight_decay": optim.weight_decay}}
    if cfg.deepspeed_config:
        ds = merge_user_config(ds, Path(cfg.deepspeed_config))
    return ds


def merge_user_config(ds: dict[str, Any], path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"backend.deepspeed_config={str(path)!r}: no such file")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    for key in OWNED_KEYS:
        if key in user and user[key] not in ("auto", ds[key]):
            raise ValueError(f"{path}: {key}={user[key]} disagrees with the trainer's {ds[key]}; remove it or set the trainer's config")
    for prec in ("bf16", "fp16"):
        enabled = user.get(prec, {}).get("enabled")
        if enabled not in (None, "auto", ds[prec]["enabled"]):
            raise ValueError(f"{path}: {prec}.enabled={enabled} disagrees with backend.precision")

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for k, v in over.items():
            if v == "auto":
                continue
            out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return out

    return merge(ds, user)


class DeepSpeedBackend(Backend):
    """Drives a DeepSpeed engine; gradient accumulation and loss scaling are DeepSpeed's."""

    def setup(self, model: Transformer, optim_cfg: OptimConfig, micro_batch: int, grad_accum: int) -> None:
        self.grad_accum = grad_accum
        self.ds_config = deepspeed_config(self.cfg, optim_cfg, micro_batch, grad_accum, self.dist.world_size)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        client_optim = None if self.cfg.offload_optimizer else build_optimizer(model, optim_cfg, self.dist.device)
        params = param_groups(model, optim_cfg.weight_decay, optim_cfg.decay_embeddings) if client_optim is None else None
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=client_optim, model_parameters=params, config=self.ds_config
        )
        self.model, self.optimizer = engine, optimizer

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, last_micro: bool) -> torch.Tensor:
        engine = self.model
        engine.train()
        loss = lm_loss(engine(inputs.to(self.dist.device)), targets.to(self.dist.device))
        engine.backward(loss)  # divides by gradient_accumulation_steps itself
        if not last_micro:
            engine.step()  # DeepSpeed counts micro-steps; this is not a boundary, so nothing is applied
        return loss.detach()

    def step(self, lr: float) -> StepResult:
        engine = self.model
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        skipped_before = engine.skipped_steps
        engine.step()
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        scale = float(engine.optimizer.loss_scale) if self.cfg.precision == "fp16" else None
        return StepResult(grad_norm=norm, skipped=engine.skipped_steps > skipped_before, loss_scale=scale)

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return lm_loss(self.model(inputs.to(self.dist.device)), targets.to(self.dist.device))

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
            torch.distributed.barrier()
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
        for group, saved in zip(self.optimizer.param_groups, hypers):
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
