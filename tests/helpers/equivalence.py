"""Compare a training run with its reference on what an optimizer cannot hide: the per-step loss, the
per-step gradient norm before clipping, and every parameter at a checkpointed step.

Tolerances come from the fp32 reduction noise measured between layouts of the same training
(tiny model of ``tests/slimpajama_train/test_backends.py``, fp32, ``grad_clip=0``, 24 steps): 1 and 2
processes, HSDP 2x2 with and without accumulation, ZeRO-1/2/3 and compiled FSDP2 differed by at most
9.5e-7 in the loss, 1.1e-7 relative in the gradient norm (summed in fp64 by ``global_grad_norm``) and
3.9e-7 in any parameter; resumed on another world size (8 steps, clipped at 1.0) and compared with
one process, 1.6e-6 (ZeRO-3 1 -> 2). Each tolerance is 6-45x that: 1e-5, 5e-6 and 1e-5. A constant gradient scale, which
AdamW hides from the loss, moves the gradient norm by the scale itself; a change of the gradients' direction
moves the parameters by ~lr per step (1e-3 here). docs/TESTING.md has the measured table.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from slimpajama_train.tools.load_checkpoint import load_model
from tests.conftest import read_metrics

LOSS_TOL = 1e-5
GRAD_NORM_REL_TOL = 5e-6
PARAM_TOL = 1e-5


@dataclass
class Difference:
    """Largest differences of a run from its reference over the steps both logged, and at ``step``."""

    steps: int
    loss: float
    grad_norm_rel: float
    params: float
    checksums_equal: bool

    @property
    def within_tolerance(self) -> bool:
        return self.loss <= LOSS_TOL and self.grad_norm_rel <= GRAD_NORM_REL_TOL and self.params <= PARAM_TOL

    def __str__(self) -> str:
        return (f"{self.steps} steps: |loss| {self.loss:.2e} (tol {LOSS_TOL:.0e}), "
                f"grad norm rel {self.grad_norm_rel:.2e} (tol {GRAD_NORM_REL_TOL:.0e}), "
                f"params max |d| {self.params:.2e} (tol {PARAM_TOL:.0e}), "
                f"checksums {'equal' if self.checksums_equal else 'differ'}")


def step_records(run_dir: Path) -> dict[int, dict]:
    """The last logged record of every train step (a resumed run rewrites the ones after its checkpoint)."""
    return {m["step"]: m for m in read_metrics(run_dir) if "loss" in m}


def final_parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every parameter of a checkpoint (any backend, any world size), full and in fp32."""
    model, _, _ = load_model(checkpoint)
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def checksum(params: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(params):
        digest.update(name.encode())
        digest.update(params[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def compare(run_dir: Path, ref_dir: Path, step: int | None = None) -> Difference:
    """``run_dir`` against ``ref_dir`` over the train steps ``run_dir`` logged, and the parameters of
    both checkpoints at ``step`` (default: the run's last step)."""
    run, ref = step_records(run_dir), step_records(ref_dir)
    steps = sorted(run)
    missing = [s for s in steps if s not in ref]
    if missing or not steps:
        raise AssertionError(f"{run_dir}: steps {missing or 'none'} have no reference record in {ref_dir}")
    loss = max(abs(run[s]["loss"] - ref[s]["loss"]) for s in steps)
    norm = max(abs(run[s]["grad_norm"] - ref[s]["grad_norm"]) / ref[s]["grad_norm"] for s in steps)
    step = step or steps[-1]
    name = f"checkpoints/step_{step:08d}"
    mine, theirs = final_parameters(run_dir / name), final_parameters(ref_dir / name)
    if sorted(mine) != sorted(theirs):
        raise AssertionError(f"{run_dir / name} and {ref_dir / name} hold different parameters")
    params = max((mine[k] - theirs[k]).abs().max().item() for k in mine)
    return Difference(len(steps), loss, norm if math.isfinite(norm) else math.inf, params,
                      checksum(mine) == checksum(theirs))


def assert_bitwise_same(run_dir: Path, ref_dir: Path, after_step: int = 0) -> None:
    """What an exact resume claims: every step after ``after_step`` logs the same train loss,
    validation loss and gradient norm, bit for bit, and the last checkpoints hold the same
    parameters (sha256 over every tensor's bytes)."""
    def records(d: Path) -> dict[int, tuple]:
        return {m["step"]: (m.get("loss"), m.get("val_loss"), m.get("grad_norm"))
                for m in read_metrics(d) if m["step"] > after_step}

    got, ref = records(run_dir), records(ref_dir)
    assert got == ref, {s: (got.get(s), ref.get(s)) for s in sorted(set(got) | set(ref)) if got.get(s) != ref.get(s)}
    name = f"checkpoints/step_{max(ref):08d}"
    assert checksum(final_parameters(run_dir / name)) == checksum(final_parameters(ref_dir / name)), name
