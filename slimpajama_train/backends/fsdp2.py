"""PyTorch FSDP2 (``fully_shard``) backend with DCP checkpoints."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from slimpajama_train.backends.base import PRECISIONS, Backend, StepResult
from slimpajama_train.backends.loss_scale import DynamicLossScaler
from slimpajama_train.checkpoint import weights_only_loads
from slimpajama_train.model import Transformer, lm_loss
from slimpajama_train.optim import OptimConfig, build_optimizer


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class FSDP2Backend(Backend):
    """Shards each transformer block, then the root (embeddings, final norm, head).

    On a single process there is nothing to shard: the model runs unwrapped (``bench_train.py``
    measured FSDP2's per-block hooks at ~5% of a CPU step there), with ``torch.autocast`` giving the
    same bf16/fp16 compute over fp32 master weights. DCP checkpoints are interchangeable either way.
    """

    def build_model(self, make_model: Callable[[], Transformer], seed: int, optim_cfg: OptimConfig, micro_batch: int,
                    grad_accum: int) -> None:
        # Built on the meta device (no memory), sharded, then materialized: each rank allocates and
        # initializes only its shard (7B: ~28 GB fp32 would otherwise sit on every rank first).
        with torch.device("meta"):
            model = make_model()
        self.sharded = self.dist.world_size > 1
        self.compute_dtype = PRECISIONS[self.cfg.precision]
        if self.sharded:
            mesh = init_device_mesh(self.dist.device.type, (self.dist.world_size,))
            # Master weights stay fp32 (the sharded parameters); compute runs in param_dtype; gradients
            # are reduced in fp32 so small per-rank contributions are not lost in half precision.
            mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
            for block in model.layers:
                fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=self.cfg.reshard_after_forward)
            fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=self.cfg.reshard_after_forward)
        model.to_empty(device=self.dist.device)
        if not self.sharded:
            model.tie_weights()  # FSDP2 keeps a tied parameter shared; a plain to_empty does not
        model.init_weights(seed)
        self.model = model
        self.optim_cfg = optim_cfg
        self.grad_clip = optim_cfg.grad_clip
        self.grad_accum = grad_accum
        self.scaler = (
            DynamicLossScaler(self.cfg.initial_loss_scale, self.cfg.loss_scale_window)
            if self.cfg.precision == "fp16" else None
        )

    def build_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.model, self.optim_cfg, self.dist.device)

    def _forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
        autocast = not self.sharded and self.compute_dtype != torch.float32
        with torch.autocast(self.dist.device.type, dtype=self.compute_dtype, enabled=autocast):
            logits = self.model(inputs.to(self.dist.device, non_blocking=True))
        return lm_loss(logits, targets.to(self.dist.device, non_blocking=True), per_sample)

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, last_micro: bool) -> torch.Tensor:
        self.model.train()
        # Gradients are reduce-scattered after every micro-batch and accumulate in the fp32 shards
        # (torchtitan's choice). Deferring the sync would keep an unsharded fp32 gradient of every
        # parameter on every rank until the last micro-batch: +27 GB per GPU at 7B, at any world size.
        loss = self._forward_loss(inputs, targets)
        scale = (self.scaler.scale if self.scaler else 1.0) / self.grad_accum
        (loss * scale).backward()
        return loss.detach()

    def step(self, lr: float) -> StepResult:
        params = [p for p in self.model.parameters() if p.grad is not None]
        # Total norm of the (possibly loss-scaled) gradients, reduced across ranks: one global decision.
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = float(_full(total))
        used_scale = self.scaler.scale if self.scaler else 1.0  # update() may change it
        skipped = self.scaler.update(norm) if self.scaler else not math.isfinite(norm)
        if not skipped:
            if self.scaler:
                # Unscale in place; the norm scales linearly, so it need not be recomputed.
                inv = 1.0 / used_scale
                for p in params:
                    p.grad.mul_(inv)
                total, norm = total * inv, norm * inv
            if self.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, total)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=norm, skipped=skipped, loss_scale=self.scaler.scale if self.scaler else None)

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self._forward_loss(inputs, targets, per_sample=True)

    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def _save(self, path: Path) -> None:
        dcp.save(self._state(), checkpoint_id=str(path))

    def save_async(self, path: Path):
        # The background thread's collectives run on a group of their own, so they never interleave
        # with the training step's collectives on the default group.
        if not hasattr(self, "_ckpt_group"):
            self._ckpt_group = torch.distributed.new_group(backend="gloo")
        path.mkdir(parents=True, exist_ok=True)
        out = dcp.async_save(self._state(), checkpoint_id=str(path), process_group=self._ckpt_group)
        return getattr(out, "upload_completion", out)  # Future, or AsyncSaveResponse in newer torch

    def _load(self, path: Path) -> None:
        state = self._state()
        with weights_only_loads():
            dcp.load(state, checkpoint_id=str(path))  # resharding to this world size happens here
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def extra_state(self) -> dict:
        return {"loss_scaler": self.scaler.state_dict()} if self.scaler else {}

    def load_extra_state(self, state: dict) -> None:
        if self.scaler and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])
