"""PyTorch FSDP2 (``fully_shard``) backend with DCP checkpoints."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from slimpajama_train.backends.base import PRECISIONS, Backend, BackendConfig, StepResult
from slimpajama_train.backends.loss_scale import DynamicLossScaler
from slimpajama_train.data.loader import to_device_batch
from slimpajama_train.model import Transformer, count_parameters
from slimpajama_train.optim import OptimConfig, build_optimizer
from slimpajama_train.safe_load import weights_only_loads


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``grads`` (DTensor shards reduced across ranks in one collective), summed
    in fp64 and returned in fp32.

    Why fp64: torch's CPU norm kernel sums fp32 squares loosely. On the demo model's 1M-element
    embedding gradient it is 3.1e-4 off the exact norm (a cascaded ``(g * g).sum()``: 6e-9), which
    made the logged norm of bitwise-identical gradients differ by 6e-5 between layouts. With fp64
    accumulation the norm is exact to fp32 rounding on any layout; the cost is one pass over the
    gradients, as before.
    """
    norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
    return _full(torch.linalg.vector_norm(torch.stack(norms), 2)).float()


def mesh_shape(cfg: BackendConfig, world_size: int, local_world_size: int) -> tuple[int, int]:
    """(replicas, shard ranks) of the FSDP2 mesh. The shard dimension defaults to one node's ranks,
    so parameter all-gathers and gradient reduce-scatters stay on NVLink and only one all-reduce per
    step crosses the network (HSDP); ``replicate = 1`` is plain FSDP2."""
    if cfg.shard_size:
        shard = cfg.shard_size
    elif cfg.replicate_size:
        shard = world_size // cfg.replicate_size
    else:
        shard = min(local_world_size, world_size)
    replicate = cfg.replicate_size or max(1, world_size // shard)
    if shard * replicate != world_size:
        raise ValueError(f"backend.shard_size={cfg.shard_size} x backend.replicate_size={cfg.replicate_size} "
                         f"(resolved {shard} x {replicate}) must equal the world size {world_size}")
    return replicate, shard


def reshard_policy(cfg: BackendConfig, n_blocks: int, n_params: int) -> list[bool]:
    """``reshard_after_forward`` of each block: as configured, or (None) True for every block but the
    last (its backward starts right after the forward, so freeing it would only all-gather it again)
    and False everywhere for a small model (gathering it costs more than its memory is worth)."""
    if cfg.reshard_after_forward is not None:
        return [cfg.reshard_after_forward] * n_blocks
    if n_params < cfg.small_model_params:
        return [False] * n_blocks
    return [i < n_blocks - 1 for i in range(n_blocks)]


class FSDP2Backend(Backend):
    """Shards each transformer block, the embedding and ``[norm, lm_head]`` as units of their own,
    then the root, over a 1-D mesh (FSDP2) or a 2-D (replicate, shard) mesh (HSDP).

    On a single process there is nothing to shard: the model runs unwrapped (``bench_train.py``
    measured FSDP2's per-block hooks at ~5% of a CPU step there), with ``torch.autocast`` giving the
    same bf16/fp16 compute over fp32 master weights; ``backend.always_shard`` wraps it anyway. DCP
    checkpoints are interchangeable between all of these.

    The optimizer step stays on the device: the global gradient norm, the non-finite decision (the
    fused AdamW kernel's ``found_inf``) and the fp16 loss scale are tensors the host never waits for.
    """

    def build_model(self, make_model: Callable[[], Transformer], seed: int, optim_cfg: OptimConfig, micro_batch: int,
                    grad_accum: int) -> None:
        # Built on the meta device (no memory), sharded, then materialized: each rank allocates and
        # initializes only its shard (7B: ~28 GB fp32 would otherwise sit on every rank first).
        with torch.device("meta"):
            model = make_model()
        self.sharded = self.dist.world_size > 1 or self.cfg.always_shard
        self.compute_dtype = PRECISIONS[self.cfg.precision]
        self.mesh_shape = (1, 1)
        if self.sharded:
            self._shard(model)
        model.to_empty(device=self.dist.device)
        if not self.sharded:
            model.tie_weights()  # FSDP2 keeps a tied parameter shared; a plain to_empty does not
        model.init_weights(seed)
        self.model = model
        self.optim_cfg = optim_cfg
        self.grad_clip = optim_cfg.grad_clip
        self.grad_accum = grad_accum
        self.scaler = (
            DynamicLossScaler(self.cfg.initial_loss_scale, self.cfg.loss_scale_window, device=self.dist.device)
            if self.cfg.precision == "fp16" else None
        )

    def _shard(self, model: Transformer) -> None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
        replicate, shard = self.mesh_shape = mesh_shape(self.cfg, self.dist.world_size, local_world)
        # A 2-D mesh makes fully_shard run HSDP; one replica is a flat mesh, plain FSDP2.
        shape, names = ((replicate, shard), ("replicate", "shard")) if replicate > 1 else ((shard,), ("shard",))
        mesh = init_device_mesh(self.dist.device.type, shape, mesh_dim_names=names)
        # Master weights stay fp32 (the sharded parameters); compute runs in param_dtype; gradients
        # are reduced in fp32 so small per-rank contributions are not lost in half precision.
        mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        policy = self.reshard_after_forward = reshard_policy(self.cfg, len(model.layers), count_parameters(model))
        for block, reshard in zip(model.layers, policy, strict=True):
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        if not model.cfg.tie_embeddings:
            # A tied table is one parameter used first and last: it stays in the root unit instead.
            # Otherwise the input side and the output side are units of their own, so the root holds
            # nothing and no unit's gather waits on another's. The output unit is used last in
            # forward and first in backward: it is never resharded in between.
            first = [model.embed_tokens, *([model.embed_proj] if hasattr(model, "embed_proj") else [])]
            last = [model.norm, *([model.head_proj] if hasattr(model, "head_proj") else []), model.lm_head]
            early = policy[0] if policy else bool(self.cfg.reshard_after_forward)
            fully_shard(first if len(first) > 1 else first[0], mesh=mesh, mp_policy=mp, reshard_after_forward=early)
            fully_shard(last, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        # The root: FSDP2 itself never reshards it after forward (its parameters are needed at once
        # in backward); that exemption is left on.
        fully_shard(model, mesh=mesh, mp_policy=mp)

    def build_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.model, self.optim_cfg, self.dist.device)

    def _loss(self, batch: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
        inputs, targets = to_device_batch(batch, self.dist.device)
        autocast = not self.sharded and self.compute_dtype != torch.float32
        with torch.autocast(self.dist.device.type, dtype=self.compute_dtype, enabled=autocast):
            return self.model(inputs, targets, per_sample=per_sample)

    def forward_backward(self, batch: torch.Tensor, last_micro: bool) -> torch.Tensor:
        self.model.train()
        if self.sharded:
            # Gradients are reduce-scattered within the shard group after every micro-batch and
            # accumulate in the fp32 shards (torchtitan's choice): deferring that would keep an
            # unsharded fp32 gradient of every parameter until the last micro-batch (+27 GB per GPU
            # at 7B). Only HSDP's all-reduce across replicas waits for the last micro-batch.
            self.model.set_requires_all_reduce(last_micro)
        loss = self._loss(batch)
        scale = self.scaler.scale / self.grad_accum if self.scaler else 1.0 / self.grad_accum
        (loss * scale).backward()
        return loss.detach()

    def step(self, lr: float) -> StepResult:
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        # Total norm of the (possibly loss-scaled) gradients, reduced across ranks on the device: one
        # global decision that no rank has to read.
        norm = global_grad_norm(grads)
        found_inf = (~torch.isfinite(norm)).float()
        if self.scaler:
            inv = self.scaler.scale.reciprocal()
            torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], inv)
            norm = norm * inv  # the norm scales linearly: no second reduction
            self.scaler.update(found_inf)
        if self.grad_clip > 0:
            # With a non-finite norm this writes NaN into the gradients; found_inf skips them below.
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # The fused kernel leaves weights, moments and step counts alone where found_inf is set.
        self.optimizer.found_inf = found_inf
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=norm, skipped=found_inf, loss_scale=self.scaler.scale if self.scaler else None)

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self._loss(batch, per_sample=True)

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

    def describe(self) -> str:
        if not self.sharded:
            return "one process, unwrapped"
        replicate, shard = self.mesh_shape
        units = "blocks resharded after forward: " + "".join("1" if r else "0" for r in self.reshard_after_forward)
        kind = f"HSDP {replicate} replicas x {shard} shards" if replicate > 1 else f"FSDP2 over {shard} ranks"
        return f"{kind}; {units}"

    def load_extra_state(self, state: dict) -> None:
        if self.scaler and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])
