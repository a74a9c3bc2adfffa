"""The root training config: the typed dataclasses of each component, composed (``conf/train.yaml``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from slimpajama_train.backends.base import BackendConfig
from slimpajama_train.callbacks import LoggerConfig
from slimpajama_train.checkpoint import CheckpointConfig
from slimpajama_train.data import DataConfig
from slimpajama_train.model import ModelConfig
from slimpajama_train.optim import OptimConfig


@dataclass
class LoopConfig:
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
        peak_tflops: per-device peak for MFU; None detects H100 (989) / A100 (312) bf16 dense peaks on GPU.
        compile: ``torch.compile`` each transformer block.
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
    compile: bool = False

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
    trainer: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        if self.resume_from is not None:
            self.checkpoint.resume = self.resume_from
        if self.checkpoint.async_save and self.backend.name != "fsdp2":
            raise ValueError("checkpoint.async_save=true needs backend=fsdp2 (DeepSpeed writes its own format synchronously)")

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.run_dir}/checkpoints"


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore so YAML is validated against the dataclasses."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
