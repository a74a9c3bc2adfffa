"""The root training config: the typed dataclasses of each component, composed (``conf/train.yaml``)."""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from data_prep import storage
from slimpajama_train.backends.base import BackendConfig
from slimpajama_train.callbacks.config import LoggerConfig
from slimpajama_train.checkpoint import CheckpointConfig
from slimpajama_train.data.dataset import DataConfig
from slimpajama_train.distributed import DistConfig
from slimpajama_train.model import ModelConfig
from slimpajama_train.optim import OptimConfig


@dataclass
class TrainerConfig:
    """The training loop.

    Attributes:
        max_steps: optimizer steps of the whole run (the LR schedule spans these).
        global_batch_size: samples (sequences) per optimizer step across all ranks.
        global_batch_tokens: the same in tokens; when set it wins and must be a multiple of seq_len.
            Gradient accumulation is derived: ``global batch / (data.micro_batch_size · world_size)``.
        log_interval: compute and log train metrics every N steps.
        eval_interval: validation every N steps (0: never); also at the last step.
        eval_batches: global batches of the holdout split per validation.
        halt_at_step: stop (with a checkpoint) after this step, leaving the run resumable; None runs to ``max_steps``.
        max_consecutive_skips: stop with an error after this many consecutive steps skipped for
            non-finite loss or gradients.
        peak_tflops: per-device peak for MFU; None looks the GPU up by name in ``metrics.PEAK_TFLOPS_BF16``
            (dense bf16: H100 SXM 989, PCIe 756, NVL 835, H200, H800, B200, A100, ...); unknown devices
            log that MFU is off.
        compile: ``torch.compile`` each transformer block and the loss; None: on for CUDA (where
            Triton and a C compiler are present; the log says why not otherwise), off on CPU.
        gc_interval: Python's garbage collector is frozen after set-up and disabled; every this many
            steps all ranks run a young-generation collection at the same step (a collection at a
            random moment on one of 512 ranks stalls all the others). 0: leave the collector alone.
    """

    max_steps: int = 1000
    global_batch_size: int = 64
    global_batch_tokens: int | None = None
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    halt_at_step: int | None = None
    max_consecutive_skips: int = 10
    peak_tflops: float | None = None
    compile: bool | None = None
    gc_interval: int = 50

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"trainer.max_steps={self.max_steps}: must be >= 1")
        if self.global_batch_size < 1:
            raise ValueError(f"trainer.global_batch_size={self.global_batch_size}: must be >= 1")
        if self.global_batch_tokens is not None and self.global_batch_tokens < 1:
            raise ValueError(f"trainer.global_batch_tokens={self.global_batch_tokens}: must be >= 1")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"trainer.max_consecutive_skips={self.max_consecutive_skips}: must be >= 1")
        if self.log_interval < 1:
            raise ValueError(f"trainer.log_interval={self.log_interval}: must be >= 1")
        if self.gc_interval < 0:
            raise ValueError(f"trainer.gc_interval={self.gc_interval}: must be >= 0 (0: automatic collection)")


@dataclass
class TrainConfig:
    """Everything ``slimpajama-train`` needs; ``conf/train.yaml`` composes into this.

    ``resume_from=<checkpoint dir>`` is a shortcut for ``checkpoint.resume=<checkpoint dir>``.
    """

    run_dir: str = "runs/default"
    seed: int = 0
    resume_from: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        for key, where in (("run_dir", self.run_dir), ("checkpoint.dir", self.checkpoint.dir),
                           ("resume_from", self.resume_from), ("checkpoint.resume", self.checkpoint.resume)):
            if where is not None and storage.is_remote(where):
                raise ValueError(f"{key}={where}: checkpoints and run folders on object storage are not supported yet "
                                 "(data.path may be a URL); give a local or shared path and copy it to the bucket "
                                 "after the run (aws s3 sync, gsutil rsync)")
        if self.checkpoint.async_save and self.backend.name != "fsdp2":
            raise ValueError("checkpoint.async_save=true needs backend=fsdp2 "
                             "(DeepSpeed writes its own format synchronously)")

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.run_dir}/checkpoints"


def batch_suggestions(global_batch: int, micro_batch: int, world_size: int) -> str:
    """What would divide: the nearest global batches, and micro-batch sizes that fit this world size."""
    unit = micro_batch * world_size
    lower, upper = (global_batch // unit) * unit, (global_batch // unit + 1) * unit
    globals_ = [g for g in (lower, upper) if g > 0]
    micros = [b for b in range(1, micro_batch + 1) if global_batch % (b * world_size) == 0][-3:]
    worlds = [w for w in range(1, 4 * world_size + 1) if global_batch % (micro_batch * w) == 0 and w != world_size]
    near = sorted(worlds, key=lambda w: abs(w - world_size))[:4]
    parts = [f"trainer.global_batch_size in {globals_} (multiples of {micro_batch} x {world_size})"]
    if micros:
        parts.append(f"data.micro_batch_size in {micros}")
    if near:
        parts.append(f"a world size in {sorted(near)}")
    return "; or ".join(parts)


def resolve_config(cfg: TrainConfig, manifest: dict[str, Any], world_size: int) -> TrainConfig:
    """The config the run actually uses, as a new object (the given one is never changed): model
    vocab and sequence length from the data manifest, the global batch in samples, ``resume_from``
    folded into ``checkpoint.resume``. Checks that the batch divides over the ranks."""
    seq_len = manifest["seq_len"]
    model = replace(cfg.model, vocab_size=cfg.model.vocab_size or manifest["tokenizer"]["vocab_size"],
                    max_seq_len=cfg.model.max_seq_len or seq_len)
    loop = cfg.trainer
    if loop.global_batch_tokens is not None:
        if loop.global_batch_tokens % seq_len:
            raise ValueError(f"trainer.global_batch_tokens={loop.global_batch_tokens} is not a multiple of the "
                             f"data's seq_len {seq_len}")
        loop = replace(loop, global_batch_size=loop.global_batch_tokens // seq_len)
    G, B = loop.global_batch_size, cfg.data.micro_batch_size
    if G % (B * world_size):
        raise ValueError(
            f"global batch of {G} samples (trainer.global_batch_size / global_batch_tokens) is not a multiple of "
            f"data.micro_batch_size={B} x world size {world_size} = {B * world_size}; use "
            + batch_suggestions(G, B, world_size)
        )
    checkpoint = cfg.checkpoint if cfg.resume_from is None else replace(cfg.checkpoint, resume=cfg.resume_from)
    return replace(copy.deepcopy(cfg), model=model, trainer=loop, checkpoint=checkpoint)


def config_hash(cfg: TrainConfig) -> str:
    """Short hash of a (resolved) config: what the checkpoint records and the log prints."""
    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore so YAML is validated against the dataclasses."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
