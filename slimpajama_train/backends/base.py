"""The backend interface the training loop drives, and its shared checks."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from slimpajama_train.distributed import DistInfo
from slimpajama_train.model import Transformer
from slimpajama_train.optim import OptimConfig

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AC_MODES = ("none", "full", "selective")


@dataclass
class BackendConfig:
    """Which distributed backend wraps the model, in what precision, with what memory savings.

    Attributes:
        name: ``fsdp2`` or ``deepspeed``.
        precision: ``bf16`` / ``fp16`` (compute in half precision; master weights, optimizer state and
            gradient reduction in fp32; fp16 adds dynamic loss scaling) or ``fp32``.
        zero_stage: DeepSpeed ZeRO stage 1, 2 or 3.
        offload_optimizer: DeepSpeed: optimizer state and step on the CPU (ZeRO-Offload).
        offload_params: DeepSpeed ZeRO-3: parameters live on the CPU between uses.
        deepspeed_config: a user DeepSpeed JSON merged over the generated one; keys the trainer owns
            (batch sizes, clipping, ZeRO stage, offload sections, precision and data-type keys,
            optimizer, scheduler) must agree with it, at any depth, or it is refused naming the key.
        reshard_after_forward: FSDP2 frees gathered parameters after forward (ZeRO-3-like memory);
            False keeps them until backward (ZeRO-2-like speed).
        activation_checkpointing: ``none``, ``full`` (every block) or ``selective`` (every ``ac_every``-th block).
        ac_every: period of selective activation checkpointing.
        initial_loss_scale: fp16 only: starting loss scale (2**16); halved on overflow, doubled after
            ``loss_scale_window`` good steps.
        loss_scale_window: fp16 only: good steps before the scale grows.
    """

    name: str = "fsdp2"
    precision: str = "bf16"
    zero_stage: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed_config: str | None = None
    reshard_after_forward: bool = True
    activation_checkpointing: str = "none"
    ac_every: int = 2
    initial_loss_scale: float = 65536.0
    loss_scale_window: int = 1000

    def __post_init__(self) -> None:
        if self.name not in ("fsdp2", "deepspeed"):
            raise ValueError(f"backend.name={self.name!r}: choose fsdp2 or deepspeed "
                             "(or backend=zero1|zero2|zero3|zero3_offload)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"backend.precision={self.precision!r}: choose one of {sorted(PRECISIONS)}")
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"backend.zero_stage={self.zero_stage}: choose 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("backend.offload_params=true needs backend.zero_stage=3")
        if self.activation_checkpointing not in AC_MODES:
            raise ValueError(f"backend.activation_checkpointing={self.activation_checkpointing!r}: "
                             f"choose one of {AC_MODES}")
        if self.ac_every < 1:
            raise ValueError(f"backend.ac_every={self.ac_every}: must be >= 1")


@dataclass
class StepResult:
    """What an optimizer step reports: the global gradient norm (before clipping), whether the update
    was skipped (non-finite gradients, or an fp16 overflow), and the current fp16 loss scale."""

    grad_norm: float
    skipped: bool
    loss_scale: float | None = None


class Backend(ABC):
    """Set up model and optimizer; forward/backward with accumulation; clip and step; save; load.

    Public :meth:`save` / :meth:`load` do the checks once and call the subclass's ``_save`` / ``_load``.
    """

    def __init__(self, cfg: BackendConfig, dist_info: DistInfo) -> None:
        self.cfg = cfg
        self.dist = dist_info
        self.model: torch.nn.Module | None = None
        self.optimizer: object | None = None

    def setup(self, make_model: Callable[[], Transformer], seed: int, optim_cfg: OptimConfig, micro_batch: int,
              grad_accum: int) -> None:
        """Build the model sharded and initialized (:meth:`build_model`), then the optimizer."""
        self.build_model(make_model, seed, optim_cfg, micro_batch, grad_accum)
        self.build_optimizer()

    @abstractmethod
    def build_model(self, make_model: Callable[[], Transformer], seed: int, optim_cfg: OptimConfig, micro_batch: int,
                    grad_accum: int) -> None:
        """Build the model so that no rank ever holds all of it (unless the strategy replicates it,
        as ZeRO-1/2 do) and initialize it deterministically from ``seed``: ``make_model()`` is
        called under a device context (meta, or DeepSpeed's ``zero.Init``) and builds without
        initializing; ``Transformer.init_weights`` then fills each rank's part."""

    @abstractmethod
    def build_optimizer(self) -> None:
        """Create the optimizer (and its state lazily) over the built model."""

    @abstractmethod
    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, last_micro: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch of ``grad_accum``; returns the detached mean loss."""

    @abstractmethod
    def step(self, lr: float) -> StepResult:
        """Clip, apply the optimizer at ``lr`` unless the gradients are non-finite, zero the gradients."""

    @abstractmethod
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of each sample of one batch (shape ``(batch,)``), without gradients."""

    @abstractmethod
    def _save(self, path: Path) -> None: ...

    @abstractmethod
    def _load(self, path: Path) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release hooks and helper threads before the process group goes away."""

    def extra_state(self) -> dict:
        """Small JSON-able state kept in ``meta.json`` (e.g. FSDP2's fp16 loss scale)."""
        return {}

    def load_extra_state(self, state: dict) -> None:  # noqa: B027 - optional hook, paired with extra_state()
        """Restore :meth:`extra_state`."""

    def save(self, path: Path) -> None:
        """Write the sharded model + optimizer state into directory ``path`` (collective)."""
        if self.model is None or self.optimizer is None:
            raise RuntimeError("backend.save() before setup()")
        path.mkdir(parents=True, exist_ok=True)
        self._save(path)

    def save_async(self, path: Path):
        """Start writing the state in the background; return a future (collective)."""
        raise NotImplementedError(f"checkpoint.async_save=true is not supported by backend.name={self.cfg.name}")

    def load(self, path: Path) -> None:
        """Load model + optimizer state written by :meth:`save` (collective)."""
        if self.model is None or self.optimizer is None:
            raise RuntimeError("backend.load() before setup()")
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint state {path} is not a directory")
        self._load(path)
