"""Training callbacks: console progress, a metrics JSONL file, Weights & Biases, checkpoint timing.

The loop calls ``on_train_start``, ``on_step_end`` (with the step's metrics) and ``on_train_end``;
everything that only observes the run lives here, not in the loop.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:
    from slimpajama_train.trainer import Trainer


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


class Callback:
    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...


class ConsoleCallback(Callback):
    """A tqdm bar over steps, and one plain line per logged step (survives non-tty logs)."""

    def on_train_start(self, trainer: "Trainer") -> None:
        self.bar = tqdm(total=trainer.cfg.trainer.max_steps, initial=trainer.step, desc="train", unit="step",
                        dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def on_step_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None:
        self.bar.update(metrics["step"] - self.bar.n)  # the step-0 evaluation does not advance the bar
        if "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}", refresh=False)
            parts = [f"step {metrics['step']:>6}", f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.2e}",
                     f"gnorm {metrics['grad_norm']:.3f}", f"tok/s {metrics['tokens_per_s']:.0f}"]
            if "val_loss" in metrics:
                parts.append(f"val_loss {metrics['val_loss']:.4f} ppl {metrics['val_ppl']:.1f}")
            self.bar.write(" | ".join(parts), file=sys.stderr)
        elif "val_loss" in metrics:
            self.bar.write(f"step {metrics['step']:>6} | val_loss {metrics['val_loss']:.4f} ppl {metrics['val_ppl']:.1f}", file=sys.stderr)

    def on_train_end(self, trainer: "Trainer") -> None:
        self.bar.close()


class MetricsFileCallback(Callback):
    """Append each logged step as one JSON line to ``<run_dir>/metrics.jsonl``."""

    def on_train_start(self, trainer: "Trainer") -> None:
        self.path = Path(trainer.cfg.run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a")

    def on_step_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None:
        self.fh.write(json.dumps(metrics) + "\n")
        self.fh.flush()

    def on_train_end(self, trainer: "Trainer") -> None:
        self.fh.close()


class WandbCallback(Callback):
    """Log config and metrics to W&B; the run id comes from the checkpoint when resuming."""

    def __init__(self, cfg: WandbConfig) -> None:
        self.cfg = cfg

    def on_train_start(self, trainer: "Trainer") -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, name=self.cfg.name, id=trainer.wandb_run_id,
            tags=list(self.cfg.tags), mode=self.cfg.mode, dir=str(trainer.cfg.run_dir),
            config=asdict(trainer.cfg), resume="allow",
        )

    def on_step_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def on_train_end(self, trainer: "Trainer") -> None:
        self.run.finish()


class CheckpointCallback(Callback):
    """Save every ``checkpoint.interval`` steps and once at the end (all ranks take part); finalize
    async saves as they complete. Runs first, so the metrics it adds reach the loggers."""

    def on_step_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None:
        trainer.poll_checkpoint()
        interval = trainer.cfg.checkpoint.interval
        if interval and trainer.step > 0 and trainer.step % interval == 0 and trainer.last_saved_step != trainer.step:
            metrics["checkpoint_blocking_s"] = trainer.save_checkpoint()

    def on_train_end(self, trainer: "Trainer") -> None:
        if trainer.last_saved_step != trainer.step:
            trainer.save_checkpoint()
        trainer.wait_checkpoint()


def build_callbacks(cfg: LoggerConfig, is_main: bool) -> list[Callback]:
    """Checkpointing runs on every rank; observers only on rank 0."""
    callbacks: list[Callback] = [CheckpointCallback()]
    if is_main:
        if cfg.console:
            callbacks.append(ConsoleCallback())
        if cfg.metrics_file:
            callbacks.append(MetricsFileCallback())
        if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            callbacks.append(WandbCallback(cfg.wandb))
    return callbacks
