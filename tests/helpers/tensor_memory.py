"""Deterministic memory measurement: the peak bytes of tensor storages created inside a region.

Process RSS depends on the allocator, the CPU's kernels and what else the process did (issue 24: a
ZeRO-3 run's RSS put activation checkpointing's ``block`` 12 MB *above* ``none`` on an Intel Xeon).
:class:`LiveTensorBytes` instead counts, through a ``TorchDispatchMode``, every storage that an
operator creates while the mode is active and sums the sizes of those still alive after each
operator. The figure is a pure function of the operator sequence: the same on every CPU and run.

What it counts: activations kept for backward, temporaries, gradients and buffers that the region
allocates (including a ZeRO-3 all-gather's output). What it does not: storages created before the
region (parameters, optimizer state, FSDP2's unsharded parameter buffers, which are resized in place,
not created), and memory outside tensors. That is what activation checkpointing changes.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` itself, or the plain tensors inside a wrapper subclass (DTensor's local shard)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return [t]
    names, _ = flatten()
    return [inner for name in names for inner in _plain_tensors(getattr(t, name))]


def _storages(tree: Any) -> list[torch.UntypedStorage]:
    """The storages behind every tensor in ``tree`` (none for meta or sparse tensors, which hold no bytes here)."""
    return [p.untyped_storage() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)
            for p in _plain_tensors(t) if p.device.type != "meta" and p.layout == torch.strided]


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the storages created inside the ``with`` block and still alive (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, weakref.ref] = {}
        self.peak = 0
        self.ops = 0

    def _track(self, out: Any, inputs: Any) -> None:
        # An output that shares a storage with an input (a view, an in-place or ``out=`` op) allocated
        # nothing: a narrow() of ZeRO-3's 2 GB gradient bucket, made before the region, is not 2 GB new.
        seen = {id(st) for st in _storages(inputs)}
        for storage in _storages(out):
            key = id(storage)
            if key not in seen and key not in self._live:
                # The key is dropped when the storage dies (ids can be reused after that).
                self._live[key] = weakref.ref(storage, lambda _, k=key: self._live.pop(k, None))

    def live_bytes(self) -> int:
        # Read each storage's size now: a storage resized in place (``resize_(0)`` to free it) counts as resized.
        return sum(st.nbytes() for ref in list(self._live.values()) if (st := ref()) is not None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        self._track(out, (args, kwargs))
        self.peak = max(self.peak, self.live_bytes())
        return out
