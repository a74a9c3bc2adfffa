"""Test helper, run under torchrun with Hydra overrides: the real ``slimpajama_train.train`` entry point,
where rank $CRASH_RANK at step $CRASH_STEP
- CRASH_AT=step:   SIGKILLs itself right after the step,
- CRASH_AT=save:   SIGKILLs itself inside that step's checkpoint, after the state shards are written
                   and before the checkpoint is completed,
- CRASH_AT=signal: sends itself $CRASH_SIGNAL (default SIGUSR1, as SLURM does before a time limit) after the step,
- CRASH_AT=build:  sends itself $CRASH_SIGNAL while the model is being built (CRASH_STEP is ignored)."""
import os
import signal

import slimpajama_train.trainer as trainer_module
from slimpajama_train import train
from slimpajama_train.checkpoint import CheckpointStore
from slimpajama_train.trainer import Trainer

crash_step, crash_rank, crash_at = int(os.environ["CRASH_STEP"]), int(os.environ["CRASH_RANK"]), os.environ["CRASH_AT"]
rank = int(os.environ.get("RANK", 0))
signal_to_send = getattr(signal, os.environ.get("CRASH_SIGNAL", "SIGUSR1"))

if crash_at == "save":
    finalize = CheckpointStore._finalize

    def crashing_finalize(self, step, tmp, *rest):
        if step == crash_step and rank == crash_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return finalize(self, step, tmp, *rest)

    CheckpointStore._finalize = crashing_finalize
elif crash_at == "build":
    build_model = trainer_module.build_model

    def signalled_build_model(cfg):
        if rank == crash_rank:
            os.kill(os.getpid(), signal_to_send)
        return build_model(cfg)

    trainer_module.build_model = signalled_build_model
else:
    train_step = Trainer.train_step
    sig = signal.SIGKILL if crash_at == "step" else signal_to_send

    def crashing_train_step(self):
        metrics = train_step(self)
        if self.step == crash_step and rank == crash_rank:
            os.kill(os.getpid(), sig)
        return metrics

    Trainer.train_step = crashing_train_step

train.main()
