"""Weights & Biases: config and metrics of rank 0; the run id is this callback's checkpointed state,
so a requeued or resumed job continues the same W&B run."""
from __future__ import annotations

import os
import sys
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimpajama_train.callbacks.base import Callback
from slimpajama_train.callbacks.config import WandbConfig

if TYPE_CHECKING:
    from slimpajama_train.trainer import Trainer

# Kept in run_dir too: a job requeued before its first checkpoint still continues the same run.
WANDB_ID_FILE = "wandb_run_id"


class WandbCallback(Callback):
    name = "wandb"

    def __init__(self, cfg: WandbConfig) -> None:
        self.cfg = cfg
        self.run_id: str | None = cfg.id
        self.run = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.cfg.id is None and state.get("run_id"):
            self.run_id = state["run_id"]

    def _run_dir_id(self, run_dir: Path) -> str:
        path = run_dir / WANDB_ID_FILE
        if path.is_file():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:12]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, path)
        return run_id

    def on_train_start(self, trainer: Trainer) -> None:
        import wandb

        if self.run_id is None:
            self.run_id = self._run_dir_id(Path(trainer.cfg.run_dir))
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, name=self.cfg.name, id=self.run_id,
            tags=list(self.cfg.tags), mode=self.cfg.mode, dir=str(trainer.cfg.run_dir),
            config=asdict(trainer.cfg), resume="allow",
        )

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        except Exception as exc:  # noqa: BLE001 - an observer must never stop the run
            self._lost(exc)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as exc:  # noqa: BLE001
            self._lost(exc)

    def _lost(self, exc: Exception) -> None:
        # SLURM's SIGTERM goes to every process of the job, W&B's wandb-core service included, and
        # it exits on it (wandb/wandb#9963). The run must still save and requeue: stop logging to
        # W&B (metrics.jsonl keeps everything); the requeued job continues the same W&B run id.
        print(f"W&B logging stopped ({type(exc).__name__}: {exc}); metrics continue in metrics.jsonl; "
              f"the next attempt resumes W&B run {self.run_id}", file=sys.stderr, flush=True)
        self.run = None
