"""Throughput on log steps: tokens/s (total and per device), MFU and peak memory, from the step time
the trainer measured over the steps since the previous log step (the host waits for the device only
at log steps, so the time between two of them is the devices' time, not the host's queueing)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slimpajama_train.callbacks.base import Callback
from slimpajama_train.mfu import peak_memory_gb

if TYPE_CHECKING:
    from slimpajama_train.trainer import Trainer


class SpeedMonitor(Callback):
    """Adds speed figures to the metrics of log steps; runs before the loggers that print them."""

    name = "speed"
    priority = 100

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        dt = metrics.get("step_time_s")
        if not dt:
            return
        world = trainer.dist.world_size
        tps = trainer.tokens_per_step / dt
        metrics.update(tokens_per_s=tps, tokens_per_s_per_device=tps / world,
                       peak_mem_gb=peak_memory_gb(trainer.dist.device))
        if trainer.peak_flops:
            metrics["mfu"] = tps / world * trainer.flops_per_token / trainer.peak_flops
