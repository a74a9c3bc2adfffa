"""The DeepSpeed JSON of a run, generated from the typed config, and a user's JSON merged over it
only where it does not contradict the trainer (batch sizes, precision, reduction dtype, clipping).

Imports no DeepSpeed: the config is built and checked before the engine exists.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from slimpajama_train.backends.base import BackendConfig
from slimpajama_train.optim import OptimConfig

# Dotted keys (and the sections under them) whose values the trainer derives, with the setting each
# follows. A user JSON (backend.deepspeed_config) may repeat them, at any depth, only with the
# trainer's value or "auto"; it may not add them where the trainer sets none (except a disabled
# section: {"enabled": false} or an offload {"device": "none"}).
OWNED_KEYS: dict[str, str] = {
    "train_batch_size": "trainer.global_batch_size",
    "train_micro_batch_size_per_gpu": "data.micro_batch_size",
    "gradient_accumulation_steps": "trainer.global_batch_size / (data.micro_batch_size x world size)",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "backend.zero_stage",
    "zero_optimization.offload_optimizer": "backend.offload_optimizer",
    "zero_optimization.offload_param": "backend.offload_params",
    "bf16": "backend.precision",
    "bfloat16": "backend.precision",  # DeepSpeed's older name of the bf16 section
    "fp16": "backend.precision",
    "fp16.initial_scale_power": "backend.initial_loss_scale",
    "fp16.loss_scale_window": "backend.loss_scale_window",
    "amp": "backend.precision",
    "torch_autocast": "backend.precision",
    "data_types": "the trainer: fp32 gradient accumulation where DeepSpeed can (see grad_accum_dtype)",
    "communication_data_type": "the trainer: gradients are reduced in fp32, as with FSDP2",
    "optimizer": "optim.* (the trainer builds the optimizer)",
    "scheduler": "optim.* (the trainer sets the learning rate every step)",
}


def grad_accum_dtype(cfg: BackendConfig) -> str:
    """The dtype DeepSpeed accumulates gradients in across micro-batches: fp32 (as FSDP2, whose
    gradients are fp32), except for ZeRO-1 in bf16 without offload, where DeepSpeed 0.19 answers
    fp32 accumulation by replacing the ZeRO-1 optimizer with its BF16_Optimizer
    (engine._do_optimizer_sanity_check), whose checkpoints are not ZeRO checkpoints
    (zero_to_fp32: "is not a zero checkpoint"): there gradients accumulate in bf16 (and are still
    reduced in fp32)."""
    if cfg.precision == "bf16" and cfg.zero_stage == 1 and not cfg.offload_optimizer:
        return "bf16"
    return "fp32"


def deepspeed_config(cfg: BackendConfig, optim: OptimConfig, micro_batch: int, grad_accum: int,
                     world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, so batch sizes, precision, reduction dtype and clipping agree
    with the trainer's."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "overlap_comm": torch.cuda.is_available(),
                            "contiguous_gradients": True}
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
        # DeepSpeed's defaults are the compute dtype for both (bf16/fp16 sums across micro-batches and
        # ranks); the FSDP2 backend reduces in fp32, and so does this one.
        "data_types": {"grad_accum_dtype": grad_accum_dtype(cfg)},
        "communication_data_type": "fp32",
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        # DeepSpeed's vectorized CPU Adam, built from this section with our weight-decay groups.
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": optim.lr, "betas": [optim.beta1, optim.beta2],
                                                       "eps": optim.eps, "weight_decay": optim.weight_decay}}
    if cfg.deepspeed_config:
        owners = {
            **OWNED_KEYS,
            "train_batch_size": f"trainer.global_batch_size = data.micro_batch_size={micro_batch} x "
                                f"{grad_accum} accumulation x {world_size} ranks",
            "train_micro_batch_size_per_gpu": f"data.micro_batch_size={micro_batch}",
            "gradient_clipping": f"optim.grad_clip={optim.grad_clip}",
            "zero_optimization.stage": f"backend.zero_stage={cfg.zero_stage}",
            "zero_optimization.offload_optimizer": f"backend.offload_optimizer={str(cfg.offload_optimizer).lower()}",
            "zero_optimization.offload_param": f"backend.offload_params={str(cfg.offload_params).lower()}",
            **{k: f"backend.precision={cfg.precision}" for k in ("bf16", "bfloat16", "fp16", "amp", "torch_autocast")},
            "fp16.initial_scale_power": f"backend.initial_loss_scale={cfg.initial_loss_scale:g}",
            "fp16.loss_scale_window": f"backend.loss_scale_window={cfg.loss_scale_window}",
            "optimizer": ("optim.lr/beta1/beta2/eps/weight_decay (backend.offload_optimizer=true: the trainer "
                          "generates DeepSpeed's CPU AdamW)") if cfg.offload_optimizer else
                         "optim.* (the trainer passes its own AdamW, so DeepSpeed would ignore this section)",
        }
        ds = merge_user_config(ds, Path(cfg.deepspeed_config), owners)
    return ds


_MISSING = object()


def _owner(dotted: str, owners: dict[str, str]) -> str | None:
    """The setting that owns ``dotted`` (its longest owned prefix), or None."""
    parts = dotted.split(".")
    return next((owners[k] for k in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if k in owners), None)


def _is_off(section: Any) -> bool:
    return isinstance(section, dict) and (section.get("enabled") is False or section.get("device") == "none")


def _contradictions(user: dict, ours: dict, path: str, owners: dict[str, str]) -> list[str]:
    found = []
    for key, value in user.items():
        dotted = f"{path}.{key}" if path else key
        if value == "auto":
            continue
        mine = ours.get(key, _MISSING)
        owner = _owner(dotted, owners)
        if owner is None:  # not the trainer's: merged as given, but owned keys may sit below it
            if isinstance(value, dict) and isinstance(mine, dict):
                found += _contradictions(value, mine, dotted, owners)
        elif mine is _MISSING:
            if not _is_off(value):
                found.append(f"{dotted}={json.dumps(value)}: the trainer sets no such key (it follows {owner})")
        elif isinstance(value, dict) and isinstance(mine, dict):
            if mine.get("enabled") is False and value.get("enabled") in (None, False, "auto"):
                continue  # a section both leave disabled: the rest of it is inert
            found += _contradictions(value, mine, dotted, owners)
        elif value != mine:
            found.append(f"{dotted}={json.dumps(value)} disagrees with the trainer's {json.dumps(mine)} (from {owner})")
    return found


def merge_user_config(ds: dict[str, Any], path: Path, owners: dict[str, str] = OWNED_KEYS) -> dict[str, Any]:
    """``ds`` with the user JSON at ``path`` merged over it (dicts recursively, "auto" values skipped).
    Refuses every key that contradicts the trainer's ``ds`` where ``owners`` says the trainer owns it,
    naming each dotted path, both values and the setting to change instead."""
    if not path.is_file():
        raise FileNotFoundError(f"backend.deepspeed_config={str(path)!r}: no such file")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(user, dict):
        raise ValueError(f"{path}: a DeepSpeed config must be a JSON object, not {type(user).__name__}")
    found = _contradictions(user, ds, "", owners)
    if found:
        raise ValueError(f"{path} (backend.deepspeed_config) contradicts the trainer's DeepSpeed config; remove "
                         "these keys (or set them to \"auto\") and change the trainer's setting instead:\n  "
                         + "\n  ".join(found))

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for k, v in over.items():
            if v == "auto":
                continue
            out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return out

    return merge(ds, user)
