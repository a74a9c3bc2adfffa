"""Dynamic loss scaling for fp16 (what DeepSpeed does internally; FSDP2 needs its own)."""
from __future__ import annotations

import math


class DynamicLossScaler:
    """Halve the scale on a non-finite gradient norm (and skip that step); double it after ``window``
    consecutive good steps. The scale is a Python float: the overflow decision is already global,
    because the gradient norm it is based on is reduced across ranks."""

    def __init__(self, initial: float = 2.0**16, window: int = 1000, min_scale: float = 1.0) -> None:
        self.scale = float(initial)
        self.window = window
        self.min_scale = min_scale
        self._good = 0

    def update(self, grad_norm: float) -> bool:
        """Record a step's (scaled) gradient norm; return True when the step must be skipped."""
        if not math.isfinite(grad_norm):
            self.scale = max(self.min_scale, self.scale / 2)
            self._good = 0
            return True
        self._good += 1
        if self._good >= self.window:
            self.scale *= 2
            self._good = 0
        return False

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good": self._good}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self._good = float(state["scale"]), int(state["good"])
