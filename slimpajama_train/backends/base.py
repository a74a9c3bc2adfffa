"""The backend interface the training loop drives, and its shared checks."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from slimpajama_train.distributed import DistInfo
from slimpajama_train.model import Transformer
from slimpajama_train.optim import OptimConfig

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class BackendConfig:
    """Which distributed backend wraps the model, and in what precision.

    Attributes:
        name: ``fsdp2``.
        precision: ``bf16`` (params/compute in bf16, gradients reduced and master weights kept in fp32) or ``fp32``.
        reshard_after_forward: FSDP2 frees gathered parameters after forward (ZeRO-3-like memory);
            False keeps them until backward (ZeRO-2-like speed).
    """

    name: str = "fsdp2"
    precision: str = "bf16"
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"backend.precision={self.precision!r}: choose one of {sorted(PRECISIONS)}")


class Backend(ABC):
    """Set up model and optimizer; forward/backward with accumulation; clip and step; save; load.

    Public :meth:`save` / :meth:`load` do the checks once and call the subclass's ``_save`` / ``_load``.
    """

    def __init__(self, cfg: BackendConfig, dist_info: DistInfo) -> None:
        self.cfg = cfg
        self.dist = dist_info
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @abstractmethod
    def setup(self, model: Transformer, optim_cfg: OptimConfig) -> None:
        """Wrap ``model`` (full weights, already initialized identically on every rank) and build the optimizer."""

    @abstractmethod
    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, loss_scale: float, sync_grads: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the detached, unscaled mean loss."""

    @abstractmethod
    def step(self, lr: float, grad_clip: float) -> float:
        """Clip (``grad_clip`` > 0), apply the optimizer at ``lr``, zero grads; return the global grad norm."""

    @abstractmethod
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of one batch without gradients."""

    @abstractmethod
    def _save(self, path: Path) -> None: ...

    @abstractmethod
    def _load(self, path: Path) -> None: ...

    def save(self, path: Path) -> None:
        """Write the sharded model + optimizer state into directory ``path`` (collective)."""
        if self.model is None or self.optimizer is None:
            raise RuntimeError("backend.save() before setup()")
        path.mkdir(parents=True, exist_ok=True)
        self._save(path)

    def load(self, path: Path) -> None:
        """Load model + optimizer state written by :meth:`save` (collective)."""
        if self.model is None or self.optimizer is None:
            raise RuntimeError("backend.load() before setup()")
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint state {path} is not a directory")
        self._load(path)
