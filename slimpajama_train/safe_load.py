"""Loading checkpoints without running code: every ``torch.load`` made safe, whoever calls it."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def weights_only_loads(allowed_globals: list = ()) -> Iterator[None]:
    """Force every ``torch.load`` inside (including DCP's and DeepSpeed's own, which pass
    ``weights_only=False``) to the safe unpickler, allowing only ``allowed_globals`` beyond tensors
    and plain containers. A checkpoint can then never run code while it is loaded."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
