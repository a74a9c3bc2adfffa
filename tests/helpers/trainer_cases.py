"""Several runs of the real :class:`~slimpajama_train.trainer.Trainer` in one torchrun launch: the
helpers that measure or mutate a training (equivalence, step memory) take a JSON list of cases, each
with its Hydra ``overrides``, and pay the process start and the process group once."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_prep.cli import conf_dir
from slimpajama_train.callbacks.build import build_callbacks
from slimpajama_train.config import TrainConfig, register_configs
from slimpajama_train.distributed import destroy_distributed, init_distributed
from slimpajama_train.preemption import StopRequest
from slimpajama_train.trainer import Trainer


def compose_train_config(overrides: list[str]) -> TrainConfig:
    """``conf/train.yaml`` with ``overrides``, as the entry point composes it."""
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="train", overrides=overrides))


def run_cases(cases_env: str, run: Callable[[Trainer, dict[str, Any]], None]) -> None:
    """For each case of the JSON file named by ``$cases_env``: a fresh Trainer from its overrides
    (default callbacks, a StopRequest of its own), ``run(trainer, case)``, then close it."""
    cases = json.loads(Path(os.environ[cases_env]).read_text())
    dist_info = init_distributed()
    try:
        for case in cases:
            cfg = compose_train_config(case["overrides"])
            trainer = Trainer(cfg, dist_info, build_callbacks(cfg.logger, dist_info.is_main), stop=StopRequest())
            try:
                run(trainer, case)
            finally:
                trainer.close()
    finally:
        destroy_distributed(barrier=True)  # no rank leaves while a peer still finishes a collective
