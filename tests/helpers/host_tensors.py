"""Test helper: which tensors this project's code keeps in host memory on purpose.

On a CPU run every tensor is a CPU tensor, so a tensor's device cannot tell the stop vote's host
tensor (meant for a gloo group) from the training's device tensors (CUDA on GPUs, reduced by
NCCL). :class:`HostTensorMode` records the intent as the code states it instead:

- host: a factory (``torch.tensor``, ``zeros``, ``full``, ``arange``...) called without a device
  or with the string ``"cpu"``; ``.cpu()``; ``.to("cpu")``; a ``*_like`` of a host tensor without
  a device; and the output of any op whose tensor inputs are all host tensors.
- the training device: everything else, among them factories given a ``torch.device`` object
  (the code's ``self.dist.device``, CUDA on GPUs) and ``.to(device)`` of a host tensor.

Only calls made directly from the project's files (``slimpajama_train/``, ``data_prep/`` and any
``extra_files``) create marks: libraries choose their own devices (DeepSpeed's CPU accelerator
passes ``device="cpu"`` for what is a GPU tensor on GPUs), and their outputs are marked only by
propagation from the project's host tensors. ``torch.from_numpy`` and ``torch.frombuffer`` bypass
modes; the project uses them for loader batches (moved to the device before any collective) and
RNG states.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[2]
PROJECT_DIRS = (f"{REPO / 'slimpajama_train'}/", f"{REPO / 'data_prep'}/")
# torch's Python glue between a call and a mode: the caller is the first frame outside these.
_GLUE = tuple(f"/torch/{name}" for name in ("overrides.py", "_tensor.py", "functional.py", "utils/_device.py"))
_MARK = "_test_host_tensor"

FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray, torch.scalar_tensor, torch.zeros, torch.ones, torch.full,
             torch.empty, torch.empty_strided, torch.arange, torch.linspace, torch.eye, torch.rand, torch.randn,
             torch.randint}
LIKE = {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like, torch.randn_like,
        torch.randint_like}


def is_host(t: Any) -> bool:
    """Whether ``t`` is a tensor the project's code put in host memory (see the module docstring)."""
    return isinstance(t, torch.Tensor) and getattr(t, _MARK, False)


def _mark(out: Any) -> None:
    for t in out if isinstance(out, (list, tuple)) else (out,):
        if isinstance(t, torch.Tensor):
            setattr(t, _MARK, True)


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    found = []
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            found.extend(t for t in v if isinstance(t, torch.Tensor))
    return found


def _host_device(device: Any) -> bool:
    """A device argument that says "host": none at all, or a string naming the CPU. A torch.device
    object is the code's training device (``self.dist.device``), whatever it is on this machine."""
    return device is None or (isinstance(device, str) and device.split(":")[0] == "cpu")


class HostTensorMode(TorchFunctionMode):
    """Marks host tensors made by the project's code, and propagates the mark (this thread only)."""

    def __init__(self, extra_files: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.project = PROJECT_DIRS + tuple(str(f) for f in extra_files)

    def from_project(self, frame: FrameType | None) -> bool:
        """Whether the first frame at or above ``frame`` outside torch's glue, this file and the
        ``__torch_function__`` of subclasses is the project's."""
        while frame is not None and (frame.f_code.co_filename.endswith(_GLUE) or frame.f_code.co_filename == __file__
                                     or frame.f_code.co_name == "__torch_function__"):
            frame = frame.f_back
        return frame is not None and frame.f_code.co_filename.startswith(self.project)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, (torch.Tensor, list, tuple)):
            return out
        if func in FACTORIES:
            if _host_device(kwargs.get("device")) and self.from_project(sys._getframe(1)):
                _mark(out)
        elif func in LIKE:
            if _host_device(kwargs.get("device")) and args and is_host(args[0]):
                _mark(out)
        elif func is torch.Tensor.cpu:
            if is_host(args[0]) or self.from_project(sys._getframe(1)):
                _mark(out)
        elif func is torch.Tensor.to:
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            if isinstance(target, str) and _host_device(target):
                if is_host(args[0]) or self.from_project(sys._getframe(1)):
                    _mark(out)
            elif target is None and is_host(args[0]):  # a dtype change stays where it is
                _mark(out)
        elif func is torch.Tensor.cuda:
            pass
        else:
            inputs = _tensors(args, kwargs)
            if inputs and all(is_host(t) for t in inputs):
                _mark(out)
        return out
