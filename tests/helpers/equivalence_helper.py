"""Test helper, run under torchrun: several training runs of the real :class:`Trainer` in one process
group (one launch instead of one per run), each optionally with a bug injected, each leaving its
``metrics.jsonl``, its checkpoints and the layout its backend built.

``$EQUIV_CASES`` names a JSON file: a list of ``{"overrides": [...], "mutation": name | null}``.
Mutations (test-only, each what a realistic regression would do):

- ``grad_x2``: every gradient doubled (the loss's backward scaled by 2; the logged loss unchanged);
- ``drop_micro``: rank 0's first micro-batch of every step contributes no gradient;
- ``wrong_divisor``: gradients accumulated over ``grad_accum`` micro-batches divided by
  ``grad_accum + 1`` (FSDP2: the backend's own divisor; DeepSpeed: the loss its backward divides
  by the accumulation steps);
- ``perturb_shard``: after a resume, rank 0's shard of one parameter moved by 1e-3 (FSDP2: its
  DTensor shard; ZeRO-1/2: its fp32 master partition and its copy of that partition's weights).

Each run writes ``layout.rank<R>.json`` into its run_dir: the FSDP2 mesh and every parameter's
placements and local shard, or the ZeRO stage's partitioning (parameters, gradients and optimizer
state held on this rank).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from slimpajama_train.trainer import Trainer
from tests.helpers.trainer_cases import run_cases

PERTURBED = "layers.0.mlp.up_proj.weight"
PERTURBATION = 1e-3


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def _inner_model(trainer: Trainer) -> torch.nn.Module:
    model = trainer.backend.model
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the Transformer


@contextlib.contextmanager
def _scaled_backward(trainer: Trainer, factor_of_micro):
    """The training loss's backward scaled by ``factor_of_micro(micro_index)`` on this rank."""
    model = _inner_model(trainer)
    forward, calls = model.forward, [0]

    def scaled(tokens, targets=None, per_sample=False, **kw):
        out = forward(tokens, targets, per_sample=per_sample, **kw)
        if targets is None or per_sample or not model.training:
            return out
        micro = calls[0] % trainer.grad_accum
        calls[0] += 1
        return _ScaleGrad.apply(out, factor_of_micro(micro))

    model.forward = scaled  # FSDP2's hooks and DeepSpeed's engine call the instance's forward
    try:
        yield
    finally:
        del model.forward


@contextlib.contextmanager
def _wrong_divisor(trainer: Trainer):
    backend = trainer.backend
    if trainer.cfg.backend.name == "fsdp2":
        backend.grad_accum += 1
        try:
            yield
        finally:
            backend.grad_accum -= 1
        return
    # DeepSpeed divides the loss by its accumulation steps inside engine.backward: the same
    # backward with the loss scaled by gas / (gas + 1) is that division by gas + 1.
    engine = backend.model
    backward, gas = engine.backward, engine.gradient_accumulation_steps()
    engine.backward = lambda loss, *a, **k: backward(loss * (gas / (gas + 1)), *a, **k)
    try:
        yield
    finally:
        del engine.backward


@torch.no_grad()
def _perturb_shard(trainer: Trainer) -> None:
    if trainer.resumed_from is None:
        raise RuntimeError("perturb_shard needs a resumed run")
    if trainer.dist.rank != 0:
        return
    if trainer.cfg.backend.name == "fsdp2":
        param = dict(_inner_model(trainer).named_parameters())[PERTURBED]
        (param.to_local() if isinstance(param, DTensor) else param).add_(PERTURBATION)
        return
    optimizer = trainer.backend.optimizer
    if trainer.cfg.backend.zero_stage == 3:
        raise NotImplementedError("perturb_shard: ZeRO-1/2 only")
    optimizer.single_partition_of_fp32_groups[0].add_(PERTURBATION)
    optimizer.parallel_partitioned_bit16_groups[0][trainer.dist.rank].add_(PERTURBATION)


@contextlib.contextmanager
def mutation(trainer: Trainer, name: str | None):
    rank = trainer.dist.rank
    if name is None:
        yield
    elif name == "grad_x2":
        with _scaled_backward(trainer, lambda micro: 2.0):
            yield
    elif name == "drop_micro":
        with _scaled_backward(trainer, lambda micro: 0.0 if rank == 0 and micro == 0 else 1.0):
            yield
    elif name == "wrong_divisor":
        with _wrong_divisor(trainer):
            yield
    elif name == "perturb_shard":
        _perturb_shard(trainer)
        yield
    else:
        raise ValueError(f"unknown mutation {name!r}")


def _fsdp2_layout(trainer: Trainer) -> dict:
    params = {}
    for name, p in _inner_model(trainer).named_parameters():
        if not isinstance(p, DTensor):
            params[name] = {"global": list(p.shape), "local": list(p.shape), "placements": []}
            continue
        local = p.to_local()
        params[name] = {"global": list(p.shape), "local": list(local.shape),
                        "placements": [str(x) for x in p.placements],
                        "mesh": list(p.device_mesh.shape), "mesh_dims": list(p.device_mesh.mesh_dim_names or ()),
                        "coordinate": p.device_mesh.get_coordinate(),
                        "local_sum": float(local.double().sum()), "global_sum": float(p.full_tensor().double().sum())}
    return {"backend": "fsdp2", "params": params}


def _zero_layout(trainer: Trainer, grads_held: int) -> dict:
    engine = trainer.backend.model
    stage = engine.zero_optimization_stage()
    params = list(engine.module.parameters())
    full = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    held = sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel() for p in params)
    zero = trainer.backend.optimizer
    inner = zero.optimizer  # the torch AdamW over this rank's fp32 partitions
    state = sum(s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s)
    flats = zero.fp32_partitioned_groups_flat if stage == 3 else zero.single_partition_of_fp32_groups
    master = sum(t.numel() for t in flats)
    return {"backend": "deepspeed", "stage": stage, "param_numel": full, "params_held": held,
            "grads_held": grads_held, "optimizer_state_held": state, "fp32_master_held": master}


def _count_grads_held(trainer: Trainer) -> dict:
    """Wrap the backend's forward_backward to count, after each micro-batch of the first step, the
    gradient elements this rank holds: on the parameters and in ZeRO's partitioned gradient buffers.
    The most over the micro-batches is what the stage keeps between them (ZeRO-1 accumulates whole
    gradients until the last micro-batch; ZeRO-2/3 reduce each micro-batch into their partition)."""
    seen: dict = {"grads": 0}
    if trainer.cfg.backend.name != "deepspeed":
        return seen
    forward_backward, calls = trainer.backend.forward_backward, [0]

    def counting(batch, last_micro):
        loss = forward_backward(batch, last_micro)
        calls[0] += 1
        if calls[0] <= trainer.grad_accum:
            engine, opt = trainer.backend.model, trainer.backend.optimizer
            on_params = sum(p.grad.numel() for p in engine.module.parameters() if p.grad is not None)
            partitions = getattr(opt, "averaged_gradients", None) or {}
            in_partitions = sum(g.numel() for grads in partitions.values() for g in (grads or []))
            if hasattr(opt, "grad_partitions_flat_buffer"):  # ZeRO-3 keeps one flat buffer of its partition
                in_partitions = max(in_partitions, int(opt.grad_partitions_flat_buffer.numel()))
            seen["grads"] = max(seen["grads"], on_params + in_partitions)
        return loss

    trainer.backend.forward_backward = counting
    return seen


def _write_layout(trainer: Trainer, grads: dict) -> None:
    layout = (_fsdp2_layout(trainer) if trainer.cfg.backend.name == "fsdp2"
              else _zero_layout(trainer, grads.get("grads", -1)))
    layout["world"] = trainer.dist.world_size
    path = Path(trainer.cfg.run_dir) / f"layout.rank{trainer.dist.rank}.json"
    path.write_text(json.dumps(layout, indent=1))


def _run_case(trainer: Trainer, case: dict) -> None:
    grads = _count_grads_held(trainer)
    with mutation(trainer, case.get("mutation")):
        trainer.fit()
    _write_layout(trainer, grads)


def main() -> None:
    run_cases("EQUIV_CASES", _run_case)


if __name__ == "__main__":
    main()
