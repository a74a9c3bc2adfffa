"""The default callback list of a run."""
from __future__ import annotations

from slimpajama_train.callbacks.base import Callback, ordered
from slimpajama_train.callbacks.config import LoggerConfig


def build_callbacks(cfg: LoggerConfig, is_main: bool) -> list[Callback]:
    """Observers run on rank 0 only (the metrics they see are already reduced across ranks)."""
    callbacks: list[Callback] = []
    if is_main:
        from slimpajama_train.callbacks.console import ConsoleCallback
        from slimpajama_train.callbacks.metrics_file import MetricsFileCallback
        from slimpajama_train.callbacks.speed import SpeedMonitor
        from slimpajama_train.callbacks.wandb_logger import WandbCallback

        callbacks.append(SpeedMonitor())
        if cfg.console:
            callbacks.append(ConsoleCallback())
        if cfg.metrics_file:
            callbacks.append(MetricsFileCallback())
        if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            callbacks.append(WandbCallback(cfg.wandb))
    return ordered(callbacks)
