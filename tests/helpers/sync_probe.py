"""Test helper, run under torchrun: train with every host-synchronizing tensor call, every wait on
the device and every ``torch.distributed`` collective counted per step, then run the backend's bare
forward/backward/step under the same counters (the training's own collectives). Writes
``$SYNC_OUT.rank<r>`` (JSON).

Host syncs counted: ``Tensor.item``, ``tolist``, ``numpy``, ``cpu``, ``to("cpu")``, ``__bool__``,
``__float__``, ``__int__``, ``__index__`` on tensors that would be on the GPU there: all but the
host tensors the project's code makes on purpose (``host_tensors.HostTensorMode``); on a GPU each
waits for the device, on the CPU they are the same calls, so counting them here finds the code that
would stall a GPU. Each is attributed to the file that called it.

Device waits counted: ``torch.cuda.synchronize``, ``Event.synchronize``/``wait``/``query``,
``Stream.synchronize`` (they exist in CPU builds; here they are counted and, without CUDA, not
run), and ``wait()`` by the project on the handle of an asynchronous collective over a tensor that
would be on the GPU (its result reaches the host only through the device). A ``wait()`` on a
collective over a host tensor (gloo, on a thread of its own) is counted apart, as a host wait.
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

from slimpajama_train.callbacks.base import Callback
from slimpajama_train.callbacks.build import build_callbacks
from slimpajama_train.distributed import destroy_distributed, init_distributed
from slimpajama_train.trainer import Trainer
from tests.helpers.host_tensors import HostTensorMode, is_host
from tests.helpers.trainer_cases import compose_train_config

SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "to", "__bool__", "__float__", "__int__", "__index__")
DEVICE_WAITS = ((torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"), (torch.cuda.Event, "wait"),
                (torch.cuda.Event, "query"), (torch.cuda.Stream, "synchronize"))
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "broadcast",
               "barrier", "reduce_scatter", "all_to_all_single", "all_gather_object", "broadcast_object_list")
FUNCOL = ("all_reduce", "all_gather_tensor", "reduce_scatter_tensor", "all_reduce_coalesced")

phase: dict = {"key": None}  # a step number, "bare", or None (not counted)
gc_runs: dict = {}  # step -> generations collected by the trainer
gc_state: dict = {}  # step -> (collector enabled?, objects frozen)
syncs: dict = {}
collectives: dict = {}
device_waits: dict = {}  # step -> Counter of "what@where"
host_waits: dict = {}


def _origin(depth: int = 2) -> str:
    """Which code made the call: the package of the calling frame (``depth`` frames up from here)."""
    frame = sys._getframe(depth)
    path = frame.f_code.co_filename
    for pkg in ("tests", "slimpajama_train", "deepspeed", "torch"):
        if f"/{pkg}/" in path:
            return f"{pkg}:{Path(path).name}:{frame.f_lineno}"
    return f"other:{path}:{frame.f_lineno}"


def _count(table: dict, what: str) -> None:
    if phase["key"] is not None:
        table.setdefault(phase["key"], Counter())[what] += 1


def _count_device_wait(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _count(device_waits, f"{name}@{_origin()}")
        if torch.cuda.is_available():
            return fn(*args, **kwargs)
        return True if name.endswith("query") else None  # counted: without CUDA there is nothing to wait for
    return wrapper


class SyncCounter(HostTensorMode):
    """Counts the host syncs of the module docstring as they pass through the mode (which sees
    every tensor method call of this thread), on tensors that are not the project's host tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS and phase["key"] is not None and not is_host(args[0]):
            # .to("cpu") from the project only: DeepSpeed's CPU accelerator names its device "cpu" too.
            to_host = name != "to" or (any(isinstance(a, str) and a.startswith("cpu")
                                           for a in (*args[1:], *(kwargs or {}).values()))
                                       and self.from_project(sys._getframe(1)))
            if to_host:
                _count(syncs, f"{name}@{_origin(2)}")  # the caller of this method
        return super().__torch_function__(func, types, args, kwargs)


mode = SyncCounter()


class CountedWork:
    """A collective's handle as the project's code gets it: its ``wait()`` is counted as a device
    wait (a tensor that would be on the GPU) or a host wait (a host tensor, over gloo)."""

    def __init__(self, work, what: str, on_device: bool) -> None:
        self._work, self._what, self._on_device = work, what, on_device

    def wait(self, *args, **kwargs):
        _count(device_waits if self._on_device else host_waits, f"{self._what}.wait@{_origin()}")
        return self._work.wait(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._work, name)


def _count_collective(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if phase["key"] is not None:
            shape = "x".join(map(str, t.shape)) if t is not None else "-"
            group = "default" if kwargs.get("group") is None else "group"
            what = f"{name}[{shape}]async={bool(kwargs.get('async_op'))}"
            collectives.setdefault(phase["key"], Counter())[f"{what}@{group}"] += 1
        out = fn(*args, **kwargs)
        if out is not None and kwargs.get("async_op") and mode.from_project(sys._getframe(1)):
            return CountedWork(out, name, on_device=not is_host(t))
        return out
    return wrapper


for owner, m in DEVICE_WAITS:
    prefix = "torch.cuda" if owner is torch.cuda else f"{owner.__name__}"
    setattr(owner, m, _count_device_wait(f"{prefix}.{m}", getattr(owner, m)))
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


cfg = compose_train_config(sys.argv[1:])
dist_info = init_distributed(cfg.dist)
mode.__enter__()  # marks the project's host tensors from here on (this thread)
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
mode.__exit__(None, None, None)
trainer.close()
Path(f"{os.environ['SYNC_OUT']}.rank{dist_info.rank}").write_text(json.dumps({
    "log_steps": log_steps, "max_steps": cfg.trainer.max_steps,
    "syncs": {str(k): dict(v) for k, v in syncs.items()},
    "collectives": {str(k): dict(v) for k, v in collectives.items()},
    "device_waits": {str(k): dict(v) for k, v in device_waits.items()},
    "host_waits": {str(k): dict(v) for k, v in host_waits.items()},
    "gc_runs": {str(k): v for k, v in gc_runs.items()}, "gc_state": {str(k): v for k, v in gc_state.items()},
    "gc_enabled_after": gc.isenabled(),
}))
destroy_distributed()
