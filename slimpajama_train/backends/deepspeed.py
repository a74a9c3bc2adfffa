"""DeepSpeed ZeRO (stages 1/2/3, optional CPU offload) backend, configured from our typed config."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported

import deepspeed  # noqa: E402

from slimpajama_train.backends.base import Backend, BackendConfig, StepResult  # noqa: E402
from slimpajama_train.checkpoint import weights_only_loads  # noqa: E402
from slimpajama_train.data import to_device_batch  # noqa: E402
from slimpajama_train.distributed import barrier  # noqa: E402
from slimpajama_train.model import Transformer  # noqa: E402
from slimpajama_train.optim import OptimConfig, build_optimizer, param_groups  # noqa: E402


def _safe_globals() -> list:
    """The only non-tensor classes DeepSpeed's checkpoints hold (found by loading them with the safe
    unpickler); everything else in them is tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


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
