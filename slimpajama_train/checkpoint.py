"""Sharded checkpoints: ``<dir>/step_00001000/{state/, meta.json}`` plus an atomic ``latest`` pointer.

A checkpoint is written under a temporary directory and renamed into place only after every rank has
finished its shards and ``meta.json`` (which lists every state file and its size) is on disk;
``latest`` is then replaced atomically. A crash mid-save therefore leaves the previous checkpoint in
charge, and a directory whose files do not match its ``meta.json`` is reported, never loaded.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from slimpajama_train.backends.base import Backend
from slimpajama_train.distributed import all_ranks_true, barrier, world

LATEST = "latest"
META = "meta.json"
STATE = "state"


@dataclass
class CheckpointConfig:
    """When and where to checkpoint, what to keep, and what to resume from.

    Attributes:
        dir: checkpoint directory; None means ``<run_dir>/checkpoints``.
        interval: save every N optimizer steps (0: only at the end and on preemption).
        keep_last: keep this many most recent checkpoints (0 keeps all).
        keep_every: also keep every checkpoint whose step is a multiple of this (0: none extra).
        resume: ``auto`` (from ``latest`` if there is one), ``none``, or a checkpoint directory.
        async_save: FSDP2 only: write with ``dcp.async_save`` in a background thread; training waits
            only for the copy to CPU memory (the blocking time is logged as ``checkpoint_blocking_s``).
    """

    dir: str | None = None
    interval: int = 100
    keep_last: int = 2
    keep_every: int = 0
    resume: str = "auto"
    async_save: bool = False

    def __post_init__(self) -> None:
        if self.interval < 0 or self.keep_last < 0 or self.keep_every < 0:
            raise ValueError("checkpoint.interval, checkpoint.keep_last and checkpoint.keep_every must be >= 0")


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


class CorruptCheckpointError(RuntimeError):
    """A checkpoint directory is incomplete or does not match its ``meta.json``."""


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


def state_files(state_dir: Path) -> dict[str, int]:
    """Relative path -> size of every file a backend wrote."""
    return {p.relative_to(state_dir).as_posix(): p.stat().st_size for p in sorted(state_dir.rglob("*")) if p.is_file()}


def read_meta(path: Path) -> dict[str, Any]:
    """Read a checkpoint's ``meta.json`` and check its state files; raise :class:`CorruptCheckpointError`."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise CorruptCheckpointError(f"{path}: no {META}; not a complete checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CorruptCheckpointError(f"{meta_path}: corrupt ({exc})") from exc
    state_dir = path / STATE
    if not state_dir.is_dir():
        raise CorruptCheckpointError(f"{path}: no {STATE}/ directory; checkpoint incomplete")
    expected = meta.get("state_files")
    if expected is None:
        raise CorruptCheckpointError(f"{meta_path}: no state_files list; written by an incompatible version")
    found = state_files(state_dir)
    for name, size in expected.items():
        if name not in found:
            raise CorruptCheckpointError(f"{path}: {STATE}/{name} is missing")
        if found[name] != size:
            raise CorruptCheckpointError(f"{path}: {STATE}/{name} has {found[name]} bytes, {META} says {size}")
    return meta


@dataclass
class _Pending:
    future: Future
    step: int
    tmp: Path
    meta: dict[str, Any]


class CheckpointManager:
    """Save, find and load checkpoints of one run (methods are collective unless noted)."""

    def __init__(self, cfg: CheckpointConfig, root: Path) -> None:
        self.cfg = cfg
        self.root = Path(root)
        self.pending: _Pending | None = None

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` points to, or None (not collective)."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        target = self.root / pointer.read_text().strip()
        if not target.is_dir():
            raise CorruptCheckpointError(f"{pointer} points to {target.name}, which does not exist")
        return target

    def resume_path(self) -> Path | None:
        if self.cfg.resume == "none":
            return None
        if self.cfg.resume == "auto":
            return self.latest()
        path = Path(self.cfg.resume)
        if not path.is_dir():
            raise FileNotFoundError(f"resume_from / checkpoint.resume={self.cfg.resume!r}: "
                                    "no such checkpoint directory")
        return path

    def save(self, step: int, backend: Backend, meta: dict[str, Any], extra_files: list[Path] = ()) -> float:
        """Write checkpoint ``step``; ``extra_files`` (e.g. the tokenizer) are copied in so it stands alone.

        Returns the seconds training was blocked. With ``async_save`` the write continues in the
        background and the checkpoint is finalized by a later :meth:`poll` or :meth:`wait`.
        """
        t0 = time.perf_counter()
        self.wait()  # at most one checkpoint in flight
        rank, world_size = world()
        tmp = self.root / f".tmp_{step_dirname(step)}"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for f in extra_files:
                shutil.copyfile(f, tmp / Path(f).name)
        barrier()
        rngs: list[Any] = [None] * world_size
        if world_size > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        full_meta = {**meta, "step": step, "world_size": world_size, "rng": rngs}
        if self.cfg.async_save:
            self.pending = _Pending(backend.save_async(tmp / STATE), step, tmp, full_meta)
        else:
            backend.save(tmp / STATE)
            self._finalize(step, tmp, full_meta)
        return time.perf_counter() - t0

    def poll(self) -> Path | None:
        """Finalize the in-flight async checkpoint if every rank has finished writing it."""
        if self.pending is None or not all_ranks_true(self.pending.future.done()):
            return None
        return self.wait()

    def wait(self) -> Path | None:
        """Block until the in-flight async checkpoint is written, then finalize it."""
        if self.pending is None:
            return None
        p, self.pending = self.pending, None
        p.future.result()
        return self._finalize(p.step, p.tmp, p.meta)

    def _finalize(self, step: int, tmp: Path, meta: dict[str, Any]) -> Path:
        rank, _ = world()
        final = self.root / step_dirname(step)
        barrier()  # every rank's shards are on disk
        if rank == 0:
            meta = {**meta, "state_files": state_files(tmp / STATE)}
            meta_tmp = tmp / f".{META}.tmp"
            meta_tmp.write_text(json.dumps(meta, indent=1))
            os.replace(meta_tmp, tmp / META)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.root / f".{LATEST}.tmp"
            pointer_tmp.write_text(final.name + "\n")
            os.replace(pointer_tmp, self.root / LATEST)
            self._prune()
        barrier()
        return final

    def load(self, path: Path, backend: Backend) -> dict[str, Any]:
        meta = read_meta(path)
        backend.load(Path(path) / STATE)
        rank, world_size = world()
        if meta.get("world_size") == world_size and meta.get("rng"):
            set_rng_state(meta["rng"][rank])
        return meta

    def _prune(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in done[: -self.cfg.keep_last]:
            step = int(old.name.split("_")[1])
            if self.cfg.keep_every and step % self.cfg.keep_every == 0:
                continue
            shutil.rmtree(old, ignore_errors=True)


class CheckpointState(Protocol):
    """What the checkpointer pulls from the trainer: small JSON-able run state, and its restore."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, meta: dict[str, Any]) -> None: ...


class Checkpointer:
    """Owns *when* to checkpoint and pulls *what* from the trainer (torchtitan's pattern): the loop
    calls :meth:`step_end` after every step and :meth:`finish` once; nothing else saves."""

    def __init__(self, cfg: CheckpointConfig, root: Path, backend: Backend, state: CheckpointState,
                 extra_files: list[Path] = (), log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.manager = CheckpointManager(cfg, root)
        self.backend = backend
        self.state = state
        self.extra_files = list(extra_files)
        self.log = log
        self.last_saved_step: int | None = None
        self.last_checkpoint: Path | None = None

    def resume(self) -> dict[str, Any] | None:
        """Load ``checkpoint.resume`` (``latest`` by default) into the backend and the trainer."""
        path = self.manager.resume_path()
        if path is None:
            return None
        meta = {**self.manager.load(path, self.backend), "path": str(path)}
        self.state.load_state_dict(meta)
        self.last_saved_step, self.last_checkpoint = meta["step"], Path(path)
        return meta

    def due(self, step: int) -> bool:
        """Whether :meth:`step_end` will save ``step`` (the trainer reads its pending step records first)."""
        interval = self.cfg.interval
        return bool(interval and step > 0 and step % interval == 0 and self.last_saved_step != step)

    def step_end(self, step: int, poll: bool = True) -> dict[str, float]:
        """Finalize a finished background save (checked only when ``poll``: the check is a small
        collective the trainer makes on log steps only); save when the interval says so. Returns the
        blocking time of a save made now, as a metric."""
        if poll and (path := self.manager.poll()) is not None:
            self._done(path)
        if self.due(step):
            return {"checkpoint_blocking_s": self.save(step)}
        return {}

    def finish(self, step: int) -> None:
        """At the end of a run (or a stop request): save this step unless it is saved (or nothing
        was trained), then wait for any background write."""
        if step > 0 and self.last_saved_step != step:
            self.save(step)
        if (path := self.manager.wait()) is not None:
            self._done(path)

    def save(self, step: int) -> float:
        """Checkpoint ``step`` now (collective); returns the seconds training was blocked."""
        blocked = self.manager.save(step, self.backend, self.state.state_dict(), extra_files=self.extra_files)
        self.last_saved_step = step
        if self.manager.pending is None:
            self._done(self.manager.root / step_dirname(step), blocked)
        else:
            self.log(f"checkpoint: step {step} writing in the background (blocked {blocked:.2f} s)")
        return blocked

    def _done(self, path: Path, blocked: float | None = None) -> None:
        self.last_checkpoint = path
        self.log(f"checkpoint: {path}" + (f" (blocked {blocked:.2f} s)" if blocked is not None else ""))
