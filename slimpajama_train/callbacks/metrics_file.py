"""Append each logged step as one JSON line to ``<run_dir>/metrics.jsonl``."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimpajama_train.callbacks.base import Callback

if TYPE_CHECKING:
    from slimpajama_train.trainer import Trainer


def last_logged_step(path: Path) -> int | None:
    """The step of the last line of a metrics file (reads only its tail)."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 65536))
        lines = fh.read().splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


class MetricsFileCallback(Callback):
    name = "metrics_file"

    def on_train_start(self, trainer: Trainer) -> None:
        self.path = Path(trainer.cfg.run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        reached = last_logged_step(self.path)
        if reached is not None and reached > trainer.step:
            # A previous attempt got further than the checkpoint this one resumed from (killed
            # before it could save): say how much work is being redone.
            print(f"the previous attempt reached step {reached}; resuming at step {trainer.step} recomputes "
                  f"{reached - trainer.step} step(s) lost since its last checkpoint", file=sys.stderr, flush=True)
        self.fh = open(self.path, "a")

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.fh.write(json.dumps(metrics) + "\n")
        self.fh.flush()

    def on_train_end(self, trainer: Trainer) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
