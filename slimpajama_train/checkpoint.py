"""Sharded checkpoints: ``<dir>/step_00001000/{state/, meta.json}`` plus an atomic ``latest`` pointer.

A checkpoint is written under a temporary directory and renamed into place only after every rank has
finished its shards and ``meta.json`` is on disk; ``latest`` is then replaced atomically. A crash
mid-save therefore leaves the previous checkpoint in charge.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slimpajama_train.backends.base import Backend

LATEST = "latest"
META = "meta.json"
STATE = "state"


@dataclass
class CheckpointConfig:
    """When and where to checkpoint, and what to resume from.

    Attributes:
        dir: checkpoint directory; None means ``<run_dir>/checkpoints``.
        interval: save every N optimizer steps (0: only at the end).
        keep_last: keep this many most recent checkpoints (0 keeps all).
        resume: ``auto`` (from ``latest`` if there is one), ``none``, or a checkpoint directory.
    """

    dir: str | None = None
    interval: int = 100
    keep_last: int = 2
    resume: str = "auto"

    def __post_init__(self) -> None:
        if self.interval < 0 or self.keep_last < 0:
            raise ValueError("checkpoint.interval and checkpoint.keep_last must be >= 0")


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, str]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def read_meta(path: Path) -> dict[str, Any]:
    """Read and check a checkpoint's ``meta.json``; a partial or foreign directory is an error, never loaded."""
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: no {META}; not a complete checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path}: corrupt ({exc})") from exc
    if not (Path(path) / STATE).is_dir():
        raise FileNotFoundError(f"{path}: no {STATE}/ directory; checkpoint incomplete")
    return meta


class CheckpointManager:
    """Save, find and load checkpoints of one run (all methods are collective unless noted)."""

    def __init__(self, cfg: CheckpointConfig, root: Path) -> None:
        self.cfg = cfg
        self.root = Path(root)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` points to, or None (not collective)."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        return self.root / pointer.read_text().strip()

    def resume_path(self) -> Path | None:
        if self.cfg.resume == "none":
            return None
        if self.cfg.resume == "auto":
            return self.latest()
        path = Path(self.cfg.resume)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint.resume={self.cfg.resume!r}: no such checkpoint directory")
        return path

    def save(self, step: int, backend: Backend, meta: dict[str, Any], extra_files: list[Path] = ()) -> Path:
        """Write checkpoint ``step``; ``extra_files`` (e.g. the tokenizer) are copied in so it stands alone."""
        rank, world = _world()
        final = self.root / step_dirname(step)
        tmp = self.root / f".tmp_{step_dirname(step)}"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        backend.save(tmp / STATE)
        rngs: list[Any] = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        _barrier()
        if rank == 0:
            full_meta = {**meta, "step": step, "world_size": world, "rng": rngs}
            for f in extra_files:
                shutil.copyfile(f, tmp / Path(f).name)
            (tmp / META).write_text(json.dumps(full_meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.root / f".{LATEST}.tmp"
            pointer_tmp.write_text(final.name + "\n")
            os.replace(pointer_tmp, self.root / LATEST)
            self._prune()
        _barrier()
        return final

    def load(self, path: Path, backend: Backend) -> dict[str, Any]:
        meta = read_meta(path)
        backend.load(Path(path) / STATE)
        rank, world = _world()
        if meta.get("world_size") == world and meta.get("rng"):
            set_rng_state(meta["rng"][rank])
        return meta

    def _prune(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in done[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
