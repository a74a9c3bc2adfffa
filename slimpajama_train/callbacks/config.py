"""Config of the logging callbacks (imports nothing else of the package)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WandbConfig:
    """Weights & Biases logging (rank 0 only).

    Attributes:
        enabled: log to W&B at all.
        mode: ``offline`` (default: no account or network needed; ``wandb sync`` later), ``online``, ``disabled``.
        project, entity, name, tags: the run's W&B coordinates.
        id: force a run id; by default a new one, kept in checkpoints so requeued jobs continue the same run.
    """

    enabled: bool = True
    mode: str = "offline"
    project: str = "slimpajama"
    entity: str | None = None
    name: str | None = None
    id: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.wandb.mode={self.mode!r}: choose offline, online or disabled")


@dataclass
class LoggerConfig:
    """Where metrics go.

    Attributes:
        console: a progress bar and a line every ``trainer.log_interval`` steps.
        metrics_file: append every logged step to ``<run_dir>/metrics.jsonl``.
        wandb: Weights & Biases settings.
    """

    console: bool = True
    metrics_file: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
