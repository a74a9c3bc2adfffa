"""Test helper, run under torchrun with Hydra overrides: the real ``slimpajama_train.train`` entry
point, with every ``torch.distributed`` collective checked against the rules it must keep on GPUs.

1. A group's backend serves only some device types (NCCL: CUDA tensors; gloo: CPU tensors). Each
   collective's tensors must have a device type its group's GPU-time backend serves, or the same
   call would raise "No backend type associated with device type cpu" on a GPU cluster. The
   default group's GPU-time backend is what ``process_group_backend(cuda=True)`` returns; a group
   made with ``new_group(backend=...)`` has the backend it names (or the default's).
2. The project's rule (``slimpajama_train/distributed.py``): collectives on the default group, or
   on any group that is NCCL on GPUs, carry tensors on the training device; host tensors go only
   over explicit gloo groups. On a CPU run every tensor is a CPU tensor, so rule 1 alone can never
   fail here; rule 2 uses the intent :class:`~tests.helpers.host_tensors.HostTensorMode`
   records (a tensor the project's code made without a device, with ``"cpu"``, or by ``.cpu()``).

Writes one JSON line per violation to $GUARD_OUT (and a summary line with the call count); with
GUARD_SIGNAL_* variables set it also sends itself $GUARD_SIGNAL after step $GUARD_SIGNAL_STEP on rank
$GUARD_SIGNAL_RANK, to exercise the stop vote and the save that follows it. $GUARD_MUTATION names a
regression of ``guard_mutations.py`` to put in first (the negative controls).
"""
import json
import os
import signal
import sys
import traceback

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from slimpajama_train import train
from slimpajama_train.distributed import process_group_backend
from slimpajama_train.trainer import Trainer
from tests.helpers import guard_mutations
from tests.helpers.host_tensors import HostTensorMode, is_host

OUT = os.environ["GUARD_OUT"]
RANK = int(os.environ.get("RANK", 0))
COLLECTIVES = ["all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce_scatter", "all_to_all_single", "reduce", "gather", "scatter", "barrier",
               "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list"]


def _device_types(spec: str) -> set[str]:
    """'cuda:nccl,cpu:gloo' -> {cuda, cpu}; a bare backend name -> the devices it serves."""
    serves = {"nccl": {"cuda"}, "gloo": {"cpu", "cuda"}, "mpi": {"cpu", "cuda"}, "ucc": {"cpu", "cuda"}}
    if ":" not in spec:
        return serves[spec.lower()]
    return {part.split(":")[0] for part in spec.split(",")}


# GUARD_DEFAULT_SPEC=nccl replays what an NCCL-only default group would accept (the negative control).
DEFAULT_GPU_SPEC = os.environ.get("GUARD_DEFAULT_SPEC") or process_group_backend(cuda=True)
group_specs: dict[int, str] = {}
calls = {"n": 0}
violations: list[dict] = []

new_group = dist.new_group


def recording_new_group(*args, **kwargs):
    group = new_group(*args, **kwargs)
    backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
    if group is not None and backend is not None:
        group_specs[id(group)] = str(backend)
    return group


dist.new_group = c10d.new_group = recording_new_group


def _nccl_devices(spec: str) -> set[str]:
    """The device types NCCL serves in a group of this GPU-time backend string."""
    if ":" not in spec:
        return {"cuda"} if spec.lower() == "nccl" else set()
    return {dev for dev, backend in (part.split(":") for part in spec.split(",")) if backend.lower() == "nccl"}


def _tensors(args, kwargs):
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (t for t in v if isinstance(t, torch.Tensor))


def _guard(name, fn):
    def wrapped(*args, **kwargs):
        if sys._getframe(1).f_code.co_name == "__torch_function__":
            # The same call again: torch hands collectives to the mode, which calls this wrapper
            # (the module's name for the collective) once more. Checked the first time.
            return fn(*args, **kwargs)
        calls["n"] += 1
        group = kwargs.get("group")
        spec = group_specs.get(id(group), DEFAULT_GPU_SPEC) if group is not None else DEFAULT_GPU_SPEC
        allowed = _device_types(spec)
        # object collectives and barrier move data through tensors of the group's own choice
        tensors = list(_tensors(args, kwargs))
        devices = {t.device.type for t in tensors} or {"cpu"}
        problems = []
        if devices - allowed:
            problems.append(f"{sorted(devices - allowed)} tensor on a group that is {spec} on GPUs")
        if "cuda" in _nccl_devices(spec) and any(is_host(t) for t in tensors):
            problems.append(f"host tensor on a group whose device tensors go over NCCL ({spec} on GPUs)")
        if problems:
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "slimpajama_train" in f.filename or "deepspeed" in f.filename
                      or f.filename == guard_mutations.__file__]  # a mutation stands for the project's code
            where = [f"{f.filename.split('/site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames[-3:]]
            violations.append({"collective": name, "group_backend_on_gpu": spec, "tensor_devices": sorted(devices),
                               "problems": problems, "where": where})
        return fn(*args, **kwargs)
    return wrapped


for name in COLLECTIVES:
    fn = getattr(c10d, name)
    wrapped = _guard(name, fn)
    setattr(c10d, name, wrapped)
    setattr(dist, name, wrapped)

if "GUARD_SIGNAL_STEP" in os.environ:
    step_fn = Trainer.train_step

    def signalling_train_step(self):
        metrics = step_fn(self)
        if self.step == int(os.environ["GUARD_SIGNAL_STEP"]) and RANK == int(os.environ.get("GUARD_SIGNAL_RANK", 0)):
            os.kill(os.getpid(), getattr(signal, os.environ.get("GUARD_SIGNAL", "SIGTERM")))
        return metrics

    Trainer.train_step = signalling_train_step


def _report() -> None:
    with open(f"{OUT}.rank{RANK}", "w") as fh:
        for v in violations:
            fh.write(json.dumps(v) + "\n")
        fh.write(json.dumps({"calls": calls["n"], "violations": len(violations)}) + "\n")


if "GUARD_MUTATION" in os.environ:
    getattr(guard_mutations, os.environ["GUARD_MUTATION"])()

try:
    # The mutations stand for the project's own code: their tensors are the project's too.
    with HostTensorMode(extra_files=(guard_mutations.__file__,)):
        train.main()
finally:
    _report()
