"""Dynamic loss scaling for fp16 (what DeepSpeed does internally; FSDP2 needs its own), on the device."""
from __future__ import annotations

import torch


class DynamicLossScaler:
    """Halve the scale on a non-finite gradient norm (that step is skipped); double it after ``window``
    consecutive good steps. Scale and counter are device tensors updated by torch's own GradScaler
    kernel (``_amp_update_scale_``), so a step never waits for the host to decide; the decision is
    global because the gradient norm behind ``found_inf`` is reduced across ranks."""

    def __init__(self, initial: float = 2.0**16, window: int = 1000, min_scale: float = 1.0,
                 device: torch.device | None = None) -> None:
        self.scale = torch.full((), float(initial), dtype=torch.float32, device=device)
        self._good = torch.zeros((), dtype=torch.int32, device=device)
        self.window = window
        self.min_scale = min_scale

    def update(self, found_inf: torch.Tensor) -> None:
        """Record a step: ``found_inf`` is a 0-d float device tensor, 1.0 when its gradients were non-finite."""
        torch._amp_update_scale_(self.scale, self._good, found_inf, 2.0, 0.5, self.window)
        self.scale.clamp_(min=self.min_scale)

    def state_dict(self) -> dict:
        return {"scale": float(self.scale), "good": int(self._good)}  # checkpoint time: a sync is fine there

    def load_state_dict(self, state: dict) -> None:
        self.scale.fill_(float(state["scale"]))
        self._good.fill_(int(state["good"]))
