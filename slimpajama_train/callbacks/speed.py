"""Throughput on log steps: step time, tokens/s (total and per device), MFU and peak memory."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from slimpajama_train.callbacks.base import Callback
from slimpajama_train.metrics import peak_memory_gb

if TYPE_CHECKING:
    from slimpajama_train.trainer import Trainer


class SpeedMonitor(Callback):
    """Adds speed figures to the metrics of log steps; runs before the loggers that print them."""

    name = "speed"
    priority = 100

    def __init__(self) -> None:
        self._t0 = 0.0

    def on_step_start(self, trainer: Trainer) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if "loss" not in metrics:
            return
        dt = time.perf_counter() - self._t0
        world = trainer.dist.world_size
        tps = trainer.tokens_per_step / dt
        metrics.update(step_time_s=dt, tokens_per_s=tps, tokens_per_s_per_device=tps / world,
                       data_wait_s=trainer.data_wait_s, peak_mem_gb=peak_memory_gb(trainer.dist.device))
        if trainer.peak_flops:
            metrics["mfu"] = tps / world * trainer.flops_per_token / trainer.peak_flops
