"""The steps between two log steps: what each left on the device, read in one transfer at the log step.

Steps that do not log never wait for the device; :meth:`LogWindow.read` gathers every rank's losses and
timings in one small collective and moves everything to the host in one copy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from slimpajama_train.backends.base import StepResult
from slimpajama_train.distributed import all_gather_tensor


@dataclass
class StepRecord:
    """What a step left on the device, read at the next log step: this rank's loss (summed over the
    micro-batches) and the backend's step result, with the batch's first global sample position."""

    step: int
    batch_start: int
    lr: float
    loss_sum: torch.Tensor
    result: StepResult


@dataclass
class WindowReadout:
    """A window read off the device. ``losses``, ``grad_norms`` and ``skipped`` are per step (the loss
    averaged over ranks and micro-batches); ``host_s`` and ``wait_s`` per rank, the mean per step of its
    host time in ``train_step`` and, within it, of its wait for the loader; ``wall_s`` per step, time
    spent outside the steps (evaluation, checkpoints) excluded."""

    records: list[StepRecord]
    losses: list[float]
    grad_norms: list[float]
    skipped: list[float]
    host_s: list[float]
    wait_s: list[float]
    wall_s: float
    loss_scale: float | None


def _on_device(x: torch.Tensor | float | bool | None, device: torch.device) -> torch.Tensor:
    if x is None:
        return torch.full((1,), float("nan"), device=device)
    return torch.as_tensor(x, dtype=torch.float32).to(device).reshape(1)


class LogWindow:
    """Collects the steps since the last log step (:meth:`add`) and reads them (:meth:`read`, collective)."""

    def __init__(self, device: torch.device, world_size: int, grad_accum: int) -> None:
        self.device, self.world_size, self.grad_accum = device, world_size, grad_accum
        self._records: list[StepRecord] = []
        self._host_s = self._wait_s = self._excluded_s = 0.0
        self._t0 = time.perf_counter()

    def __len__(self) -> int:
        return len(self._records)

    def restart_clock(self) -> None:
        self._t0 = time.perf_counter()

    def add(self, record: StepRecord, host_s: float, wait_s: float) -> None:
        self._records.append(record)
        self._host_s += host_s
        self._wait_s += wait_s

    def exclude(self, seconds: float) -> None:
        """Time between steps (evaluation, checkpoints, logging) that is not step time."""
        self._excluded_s += seconds

    def read(self) -> WindowReadout:
        """Empty the window: one all-gather of every rank's losses and timings, then one
        device-to-host transfer of everything."""
        records, self._records = self._records, []
        k, W, dev = len(records), self.world_size, self.device
        mine = torch.cat([torch.stack([r.loss_sum.float().reshape(()) for r in records]),
                          torch.tensor([self._host_s, self._wait_s], device=dev)])
        gathered = all_gather_tensor(mine)  # (W * (k + 2),): rank by rank
        last = records[-1].result
        parts = [gathered, *(_on_device(r.result.grad_norm, dev) for r in records),
                 *(_on_device(r.result.skipped, dev) for r in records), _on_device(last.loss_scale, dev)]
        host = torch.cat(parts).tolist()  # the one device-to-host transfer of the window
        per_rank = [host[w * (k + 2):(w + 1) * (k + 2)] for w in range(W)]
        now = time.perf_counter()
        wall = (now - self._t0 - self._excluded_s) / k
        self._host_s = self._wait_s = self._excluded_s = 0.0
        self._t0 = now
        return WindowReadout(
            records=records,
            losses=[sum(r[i] for r in per_rank) / (self.grad_accum * W) for i in range(k)],
            grad_norms=host[W * (k + 2): W * (k + 2) + k],
            skipped=host[W * (k + 2) + k: W * (k + 2) + 2 * k],
            host_s=[r[k] / k for r in per_rank],
            wait_s=[r[k + 1] / k for r in per_rank],
            wall_s=wall,
            loss_scale=host[-1] if last.loss_scale is not None else None,
        )
