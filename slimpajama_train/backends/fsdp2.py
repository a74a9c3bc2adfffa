"""PyTorch FSDP2 (``fully_shard``) backend with DCP checkpoints."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from slimpajama_train.backends.base import PRECISIONS, Backend
from slimpajama_train.model import Transformer, lm_loss
from slimpajama_train.optim import OptimConfig, build_optimizer


class FSDP2Backend(Backend):
    """Shards each transformer block, then the root (embeddings, final norm, head)."""

    def setup(self, model: Transformer, optim_cfg: OptimConfig) -> None:
        mesh = init_device_mesh(self.dist.device.type, (self.dist.world_size,))
        dtype = PRECISIONS[self.cfg.precision]
        # Master weights stay fp32 (the sharded parameters); compute runs in param_dtype; gradients
        # are reduced in fp32 so small per-rank contributions are not lost in bf16.
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        model.to(self.dist.device)
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=self.cfg.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=self.cfg.reshard_after_forward)
        self.model = model
        self.optimizer = build_optimizer(model, optim_cfg, self.dist.device)

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, loss_scale: float, sync_grads: bool) -> torch.Tensor:
        self.model.train()
        # Skip the reduce-scatter on all but the last micro-batch: gradients accumulate unsharded locally.
        self.model.set_requires_gradient_sync(sync_grads)
        loss = lm_loss(self.model(inputs.to(self.dist.device, non_blocking=True)), targets.to(self.dist.device, non_blocking=True))
        (loss * loss_scale).backward()
        return loss.detach()

    def step(self, lr: float, grad_clip: float) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return lm_loss(self.model(inputs.to(self.dist.device)), targets.to(self.dist.device))

    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def _save(self, path: Path) -> None:
        dcp.save(self._state(), checkpoint_id=str(path))

    def _load(self, path: Path) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=str(path))  # resharding to this world size happens here
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
