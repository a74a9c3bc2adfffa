"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from slimpajama_train.model import full_shape


@dataclass
class OptimConfig:
    """Optimizer and schedule.

    Attributes:
        lr: peak learning rate.
        schedule: ``cosine`` (warmup, then cosine decay to the floor) or ``wsd`` (warmup-stable-decay:
            constant ``lr`` until the last ``decay_fraction`` of steps, then linear decay to the floor).
        min_lr_ratio: floor of the decay as a fraction of ``lr``.
        warmup_steps: linear warmup from 0.
        decay_fraction: WSD only: share of the run spent decaying.
        weight_decay: decoupled weight decay on matrices; norms and biases get none.
        decay_embeddings: also decay the embedding table (off by default, as in Llama/OLMo).
        beta1, beta2, eps: AdamW moments.
        grad_clip: max global gradient norm; 0 disables clipping.
        fused: use the fused AdamW kernel where the device supports it (CUDA).
    """

    lr: float = 3e-4
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    fused: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr}: must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"optim.schedule={self.schedule!r}: choose cosine or wsd")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"optim.decay_fraction={self.decay_fraction}: must be in (0, 1]")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps}: must be >= 0")


def schedule_warning(cfg: OptimConfig, max_steps: int) -> str | None:
    """A line for a warm-up at least as long as the run (the learning rate never reaches ``optim.lr``
    and never decays), else None."""
    if max_steps > 0 and cfg.warmup_steps >= max_steps:
        last = lr_at(max_steps - 1, cfg, max_steps)
        return (f"warning: optim.warmup_steps={cfg.warmup_steps} >= trainer.max_steps={max_steps}: the whole run is "
                f"warm-up (the learning rate rises to {last:.3g} of optim.lr={cfg.lr:g} at the last step and never "
                "decays); set optim.warmup_steps below trainer.max_steps (often 1-10% of it)")
    return None


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine or WSD decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, max_steps - int(round(cfg.decay_fraction * max_steps)))
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start + 1) / max(1, max_steps - decay_start))
        return cfg.lr - (cfg.lr - floor) * progress
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Decay only ≥2-D weights (norm scales and biases are 1-D); embeddings only if asked."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # a tied weight appears once, under its first name
        if not p.requires_grad:
            continue
        is_embedding = name.startswith("embed_tokens.")
        ndim = len(full_shape(p))  # not p.ndim: a ZeRO-3 placeholder is 1-D and empty
        (decay if ndim >= 2 and (decay_embeddings or not is_embedding) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the decay / no-decay groups. Fused on CUDA and CPU alike: the fused kernel takes the
    step's ``found_inf`` flag as a device tensor and skips the update on the device, so a non-finite
    step costs no host synchronization (and CPU runs take the same path as GPU runs)."""
    fused = cfg.fused and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.decay_embeddings), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps, fused=fused,
    )
