"""The backend interface the training loop drives, and its shared checks."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from slimpajama_train.distributed import DistInfo
from slimpajama_train.model import AC_MODES, Transformer
from slimpajama_train.optim import OptimConfig

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        shard_size: FSDP2: ranks that shard each parameter (HSDP's intra-node dimension); None: the
            ranks of one node (``LOCAL_WORLD_SIZE``), capped at the world size. ``shard_size = world``
            is plain FSDP2 (one flat mesh).
        replicate_size: FSDP2: replicas of the shards (HSDP's inter-node dimension); None: world / shard_size.
            Gradients are reduce-scattered within a replica every micro-batch; only the all-reduce
            across replicas is deferred to the last micro-batch of a step.
        reshard_after_forward: FSDP2: free each block's gathered parameters after its forward and
            gather them again in backward (ZeRO-3-like memory; True), or keep them (ZeRO-2-like; False).
            None chooses per unit: True for every block but the last (whose backward starts at once),
            False everywhere when the model is small (under ``small_model_params``).
        small_model_params: FSDP2: below this many parameters, None above keeps every unit gathered.
        always_shard: FSDP2: wrap with ``fully_shard`` even on one process (benchmarks of the real
            sharded path); by default one process runs the model unwrapped under autocast.
        activation_checkpointing: ``none``; ``block`` (recompute every ``ac_every``-th whole block);
            ``op`` (every block keeps the outputs of its matmuls and attention and recomputes the
            cheap elementwise ops: torch's selective activation checkpointing); ``full`` (recompute
            every block).
        ac_every: period of ``block`` activation checkpointing.
        loss_chunk_tokens: the training loss runs the output projection and cross-entropy over this
            many tokens at a time, so the (tokens x vocab) fp32 logits never exist at once; 0: one
            plain projection and cross-entropy over the whole micro-batch.
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
    shard_size: int | None = None
    replicate_size: int | None = None
    reshard_after_forward: bool | None = None
    small_model_params: int = 200_000_000
    always_shard: bool = False
    activation_checkpointing: str = "none"
    ac_every: int = 2
    loss_chunk_tokens: int = 8192
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
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"backend.loss_chunk_tokens={self.loss_chunk_tokens}: must be >= 0 (0: unchunked)")
        for key in ("shard_size", "replicate_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"backend.{key}={getattr(self, key)}: must be >= 1 (or null: derived)")


@dataclass
class StepResult:
    """What an optimizer step reports: the global gradient norm (before clipping), whether the update
    was skipped (non-finite gradients, or an fp16 overflow), and the current fp16 loss scale.

    Each may be a device tensor the step has not waited for (FSDP2); the trainer reads them all in
    one transfer at the next log step, so steps in between never synchronize with the host.
    """

    grad_norm: torch.Tensor | float
    skipped: torch.Tensor | bool
    loss_scale: torch.Tensor | float | None = None


class Backend(ABC):
    """Build model and optimizer; forward/backward with accumulation; clip and step; save; load.

    Public :meth:`save` / :meth:`load` do the checks once and call the subclass's ``_save`` / ``_load``.
    """

    def __init__(self, cfg: BackendConfig, dist_info: DistInfo) -> None:
        self.cfg = cfg
        self.dist = dist_info
        self.model: torch.nn.Module | None = None
        self.optimizer: object | None = None

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
    def forward_backward(self, batch: torch.Tensor, last_micro: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch of ``grad_accum``: ``batch`` is the loader's
        ``(B, T + 1)`` host tensor of token ids (inputs and targets in one copy). Returns the detached
        mean loss, on the device (not read here)."""

    @abstractmethod
    def step(self, lr: float) -> StepResult:
        """Clip, apply the optimizer at ``lr`` unless the gradients are non-finite, zero the gradients."""

    @abstractmethod
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean loss of each sample of one ``(B, T + 1)`` batch (shape ``(B,)``, on the device), without gradients."""

    @abstractmethod
    def _save(self, path: Path) -> None: ...

    @abstractmethod
    def _load(self, path: Path) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release hooks and helper threads before the process group goes away."""

    def describe(self) -> str:
        """How the model is laid out over the ranks, for the start-up log."""
        return ""

    def extra_state(self) -> dict:
        """Small JSON-able state kept in ``meta.json`` (e.g. FSDP2's fp16 loss scale)."""
        return {}

    def load_extra_state(self, state: dict) -> None:  # noqa: B027 - optional hook, paired with extra_state()
        """Restore :meth:`extra_state`."""

    def save(self, path: Path) -> None:
        """Write the sharded model + optimizer state into directory ``path`` (collective)."""
        if self.model is None or self.optimizer is None:
            raise RuntimeError("backend.save() before build_model() and build_optimizer()")
        path.mkdir(parents=True, exist_ok=True)
        self._save(path)

    def save_async(self, path: Path):
        """Start writing the state in the background; return a future (collective)."""
        raise NotImplementedError(f"checkpoint.async_save=true is not supported by backend.name={self.cfg.name}")

    def load(self, path: Path) -> None:
        """Load model + optimizer state written by :meth:`save` (collective)."""
        if self.model is None or self.optimizer is None:
            raise RuntimeError("backend.load() before build_model() and build_optimizer()")
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint state {path} is not a directory")
        self._load(path)
