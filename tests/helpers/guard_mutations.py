"""Regressions that ``collective_guard.py`` must catch, put in by name ($GUARD_MUTATION); the guard
counts this file as the project's code (what each mutation stands for)."""
import torch
import torch.distributed as dist

from slimpajama_train.trainer import Trainer


def cpu_all_reduce_in_step() -> None:
    """Every training step all-reduces a host tensor on the default group (a counter summed across
    ranks, written the short way): fine on the CPU and under ``cuda:nccl,cpu:gloo``, but against
    the rule that the default group carries device tensors."""
    step = Trainer.train_step

    def train_step(self):
        seen = torch.tensor([float(self.step)])
        dist.all_reduce(seen)
        return step(self)

    Trainer.train_step = train_step
