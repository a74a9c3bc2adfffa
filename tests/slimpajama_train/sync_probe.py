"""Test helper, run under torchrun: train with every host-synchronizing tensor call and every
``torch.distributed`` collective counted per step, then run the backend's bare forward/backward/step
under the same counters (the training's own collectives). Writes ``$SYNC_OUT.rank<r>`` (JSON).

Host syncs counted: ``Tensor.item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``
(on a GPU each waits for the device; on the CPU they are the same calls, so counting them here finds
the code that would stall a GPU). Each is attributed to the file that called it.
"""
import functools
import gc
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_prep.config import conf_dir
from slimpajama_train.callbacks.base import Callback
from slimpajama_train.callbacks.build import build_callbacks
from slimpajama_train.config import register_configs
from slimpajama_train.distributed import destroy_distributed, init_distributed
from slimpajama_train.trainer import Trainer

SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "broadcast",
               "barrier", "reduce_scatter", "all_to_all_single", "all_gather_object", "broadcast_object_list")
FUNCOL = ("all_reduce", "all_gather_tensor", "reduce_scatter_tensor", "all_reduce_coalesced")

phase: dict = {"key": None}  # a step number, "bare", or None (not counted)
gc_runs: dict = {}  # step -> generations collected by the trainer
gc_state: dict = {}  # step -> (collector enabled?, objects frozen)
syncs: dict = {}
collectives: dict = {}


def _origin() -> str:
    """Which code made the call: the package of the calling frame (skipping this file)."""
    frame = sys._getframe(2)
    path = frame.f_code.co_filename
    for pkg in ("slimpajama_train", "deepspeed", "torch", "tests"):
        if f"/{pkg}/" in path:
            return f"{pkg}:{Path(path).name}:{frame.f_lineno}"
    return f"other:{path}:{frame.f_lineno}"


def _count_sync(name, fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if phase["key"] is not None:
            syncs.setdefault(phase["key"], Counter())[f"{name}@{_origin()}"] += 1
        return fn(self, *args, **kwargs)
    return wrapper


def _count_collective(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if phase["key"] is not None:
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            shape = "x".join(map(str, t.shape)) if t is not None else "-"
            collectives.setdefault(phase["key"], Counter())[f"{name}[{shape}]async={bool(kwargs.get('async_op'))}"] += 1
        return fn(*args, **kwargs)
    return wrapper


for m in SYNC_METHODS:
    setattr(torch.Tensor, m, _count_sync(m, getattr(torch.Tensor, m)))
for c in COLLECTIVES:
    setattr(dist, c, _count_collective(c, getattr(dist, c)))
for c in FUNCOL:
    if hasattr(funcol, c):
        setattr(funcol, c, _count_collective(f"funcol.{c}", getattr(funcol, c)))


_collect = gc.collect


def counted_collect(generation=2):
    if phase["key"] is not None:
        gc_runs.setdefault(phase["key"], []).append(generation)
    return _collect(generation)


gc.collect = counted_collect


class StepMarker(Callback):
    name = "step_marker"

    def on_step_start(self, trainer) -> None:
        phase["key"] = trainer.step + 1
        gc_state[phase["key"]] = (gc.isenabled(), gc.get_freeze_count())


register_configs()
with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
    cfg = OmegaConf.to_object(compose(config_name="train", overrides=sys.argv[1:]))
dist_info = init_distributed(cfg.dist)
# The run's own callbacks (console, metrics file, speed) too: they must not synchronize either.
trainer = Trainer(cfg, dist_info, callbacks=[StepMarker(), *build_callbacks(cfg.logger, dist_info.is_main)])
log_steps = [s for s in range(1, cfg.trainer.max_steps + 1) if trainer.is_log_step(s)]
if os.environ.get("SLOW_DATA_RANK") == str(dist_info.rank):  # a straggler: this rank's input is late
    import time

    def slow(it, delay=float(os.environ["SLOW_DATA_S"])):
        for batch in it:
            time.sleep(delay)
            yield batch

    trainer.train_iter = slow(trainer.train_iter)
trainer.fit()
phase["key"] = None

# The backend alone, on batches of the same loader: forward/backward per micro-batch, then the step.
bare_steps = 3
for n in range(bare_steps):
    phase["key"] = f"bare{n}"
    for micro in range(trainer.grad_accum):
        trainer.backend.forward_backward(next(trainer.train_iter), last_micro=micro == trainer.grad_accum - 1)
    trainer.backend.step(1e-4)
phase["key"] = None
trainer.close()
Path(f"{os.environ['SYNC_OUT']}.rank{dist_info.rank}").write_text(json.dumps({
    "log_steps": log_steps, "max_steps": cfg.trainer.max_steps,
    "syncs": {str(k): dict(v) for k, v in syncs.items()},
    "collectives": {str(k): dict(v) for k, v in collectives.items()},
    "gc_runs": {str(k): v for k, v in gc_runs.items()}, "gc_state": {str(k): v for k, v in gc_state.items()},
    "gc_enabled_after": gc.isenabled(),
}))
destroy_distributed()
