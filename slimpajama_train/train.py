"""``slimpajama-train``: pretrain a decoder-only LM on prepared shards.

Launch::

    # one process (CPU or one GPU)
    slimpajama-train experiment=demo
    # one node, 8 GPUs
    torchrun --nproc-per-node 8 -m slimpajama_train.train model=1.3b data.path=/data/shards
    # several nodes
    torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m slimpajama_train.train model=1.3b data.path=/data/shards
    # SLURM
    sbatch launch/slurm/train.sbatch model=1.3b data.path=/data/shards

Any config field is a Hydra override (``trainer.max_steps=2000 optim.lr=1e-3``); see ``conf/``.
"""
from __future__ import annotations

from slimpajama_train.preemption import StopRequest

# Run as a module (torchrun -m), the handler goes in before the heavy imports below (torch, Hydra,
# DeepSpeed: seconds): a scheduler's SIGTERM during start-up is recorded, not lost.
_EARLY_STOP = StopRequest().install() if __name__ == "__main__" else None

import json  # noqa: E402
import sys  # noqa: E402
from typing import NoReturn  # noqa: E402

from omegaconf import DictConfig  # noqa: E402

from data_prep.cli import hydra_cli, to_config  # noqa: E402
from slimpajama_train.callbacks.build import build_callbacks  # noqa: E402
from slimpajama_train.config import TrainConfig, register_configs  # noqa: E402
from slimpajama_train.distributed import destroy_distributed, init_distributed  # noqa: E402
from slimpajama_train.optim import schedule_warning  # noqa: E402
from slimpajama_train.trainer import Trainer  # noqa: E402

# Exit status of a run that stopped on SIGTERM/SIGUSR1 after saving: EX_TEMPFAIL ("try again"),
# which launch/slurm/train.sbatch turns into a requeue.
PREEMPTED_EXIT_CODE = 75


def run(cfg: TrainConfig, stop: StopRequest | None = None) -> dict:
    """Train with ``cfg`` inside an initialized process group; returns the trainer's summary."""
    # First, before anything slow (process group, model build, resume): a scheduler's SIGTERM or
    # SIGUSR1 from now on is recorded and honoured at the first step boundary.
    stop = stop or StopRequest().install()
    dist_info = init_distributed(cfg.dist)
    if dist_info.is_main and (warning := schedule_warning(cfg.optim, cfg.trainer.max_steps)):
        print(warning, file=sys.stderr, flush=True)
    trainer, clean = None, False
    try:
        trainer = Trainer(cfg, dist_info, build_callbacks(cfg.logger, dist_info.is_main), stop=stop)
        summary = trainer.fit()
        if dist_info.is_main:
            print(json.dumps(summary), flush=True)
        clean = True
        return summary
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed(barrier=clean)


def main() -> None:
    stop = _EARLY_STOP or StopRequest().install()  # before Hydra composes the config and torch initializes
    register_configs()

    preempted = False

    def _app(dcfg: DictConfig) -> None:
        nonlocal preempted
        preempted = run(to_config(dcfg), stop).get("preempted", False)  # the raw DictConfig stops here

    # A config error (unknown key, bad value) ends in two lines; HYDRA_FULL_ERROR=1 shows the traceback.
    hydra_cli("slimpajama-train", "train", _app)
    if preempted:
        exit_for_requeue(stop)


def exit_for_requeue(stop: StopRequest) -> NoReturn:
    """End the process with PREEMPTED_EXIT_CODE, which no later stop signal can change."""
    stop.ignore_from_now()
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
