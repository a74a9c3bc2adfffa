"""Sharded checkpoints: ``<dir>/step_00001000/{state/, meta.json}`` plus an atomic ``latest`` pointer.

A checkpoint is written under a temporary directory and renamed into place only after every rank has
finished its shards, hashed them (sha256, each rank its own files) and ``meta.json`` (which lists
every file with its size and checksum) is on disk; ``latest`` is then replaced atomically. A crash or
a full disk mid-save therefore leaves the previous checkpoint in charge, and a checkpoint whose files
do not match its ``meta.json`` is reported naming the file, never loaded: ``resume=auto`` then falls
back to the newest intact one. Checkpoints are ordered by step number; a fresh start in a directory
that holds checkpoints is refused unless ``checkpoint.on_existing`` says what to do with them.
"""
from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from data_prep.cli import UserError
from slimpajama_train.backends.base import Backend
from slimpajama_train.distributed import all_gather_object, all_ranks_true, barrier, broadcast_object, world

LATEST = "latest"
META = "meta.json"
STATE = "state"
ARCHIVE_PREFIX = "archive_"
CORRUPT_DIR = "corrupt"
# sha256 (hashlib): 1.2-1.6 GB/s in memory, 1.16 GB/s reading a fresh shard back from the page cache
# (~0.9 s per GB) on a shared 2-core host; blake2b is slower, zlib.crc32 ~3.5x faster but weak
# (benchmarks/bench_checksum.py). A rank at 64 GPUs x 7B hashes ~1.3 GB: ~1.1 s per synchronous save.
CHECKSUM = "sha256"
READ_CHUNK = 8 << 20
ON_EXISTING = ("refuse", "archive", "overwrite")
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Files one rank writes: DCP's ``__<rank>_<n>.distcp``, DeepSpeed's ``zero_pp_rank_<rank>_...``. The
# rest (DCP's .metadata, DeepSpeed's mp_rank_00 model states, the tokenizer) are rank 0's.
_RANK_FILE = (re.compile(r"(?:^|/)__(\d+)_\d+\.distcp$"), re.compile(r"zero_pp_rank_(\d+)_"))


@dataclass
class CheckpointConfig:
    """When and where to checkpoint, what to keep, and what to resume from.

    Attributes:
        dir: checkpoint directory; None means ``<run_dir>/checkpoints``.
        interval: save every N optimizer steps (0: only at the end and on preemption).
        keep_last: keep this many most recent checkpoints by step (0 keeps all). The newest
            checkpoint that was verified (every file hashed, finite loss) is also kept until a
            newer one is verified.
        keep_every: also keep every checkpoint whose step is a multiple of this (0: none extra).
        resume: ``auto`` (from ``latest``; a corrupt one falls back to the newest intact checkpoint),
            ``none``, or a checkpoint directory.
        on_existing: what a run that would overwrite checkpoints does with them: a fresh start in a
            directory that holds checkpoints, or a resume from one that is older than others there.
            ``refuse`` (stop with a message), ``archive`` (move them to ``<dir>/archive_<time>/``),
            ``overwrite`` (delete them).
        async_save: FSDP2 only: write with ``dcp.async_save`` in a background thread (which also
            hashes the files); training waits only for the copy to CPU memory (the blocking time is
            logged as ``checkpoint_blocking_s``).
    """

    dir: str | None = None
    interval: int = 100
    keep_last: int = 2
    keep_every: int = 0
    resume: str = "auto"
    on_existing: str = "refuse"
    async_save: bool = False

    def __post_init__(self) -> None:
        if self.interval < 0 or self.keep_last < 0 or self.keep_every < 0:
            raise ValueError("checkpoint.interval, checkpoint.keep_last and checkpoint.keep_every must be >= 0")
        if self.on_existing not in ON_EXISTING:
            raise ValueError(f"checkpoint.on_existing={self.on_existing!r}: choose one of {ON_EXISTING}")


class CorruptCheckpointError(UserError, RuntimeError):
    """A checkpoint directory is incomplete or does not match its ``meta.json``."""


class CheckpointWriteError(UserError, RuntimeError):
    """A save failed (e.g. the disk is full); its temporary directory is removed, ``latest`` is unchanged."""


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``step_<N>`` directory name, or None for anything else."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: Path) -> list[Path]:
    """The ``step_<N>`` directories under ``root``, ordered by step number (never by name)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if p.is_dir() and (s := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


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


def file_owner(rel: str, world_size: int) -> int:
    """The rank that hashes file ``rel`` of a checkpoint: the rank that wrote it (DCP's and
    DeepSpeed's per-rank files), else rank 0; modulo ``world_size`` when the world changed."""
    for pattern in _RANK_FILE:
        if m := pattern.search(rel):
            return int(m.group(1)) % world_size
    return 0


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 8 MiB chunks (hashlib releases the GIL: a background thread hashing
    does not stall the training loop's Python)."""
    h = hashlib.new(CHECKSUM)
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _checkpoint_files(ckpt: Path) -> list[str]:
    """Every file of a checkpoint directory except ``meta.json`` and its temporary, relative to it."""
    return [p.relative_to(ckpt).as_posix() for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name not in (META, f".{META}.tmp")]


def hash_own_files(ckpt: Path, rank: int, world_size: int) -> dict[str, list]:
    """``{relative path: [bytes, sha256]}`` of the files of ``ckpt`` this rank wrote (not collective)."""
    return {rel: [(ckpt / rel).stat().st_size, file_digest(ckpt / rel)]
            for rel in _checkpoint_files(ckpt) if file_owner(rel, world_size) == rank}


def read_meta(path: Path) -> dict[str, Any]:
    """Read a checkpoint's ``meta.json`` and check that its files exist with their recorded sizes
    (cheap; checksums are checked by :func:`verify_files`); raise :class:`CorruptCheckpointError`."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise CorruptCheckpointError(f"{path}: no {META}; not a complete checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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
            raise CorruptCheckpointError(f"{path}/{STATE}/{name} is missing")
        if found[name] != size:
            raise CorruptCheckpointError(f"{path}/{STATE}/{name} has {found[name]} bytes, {META} says {size}")
    return meta


def verify_files(path: Path, meta: dict[str, Any], rank: int = 0, world_size: int = 1) -> list[str]:
    """Check the files this rank owns against the sizes and checksums in ``meta``; one line per bad
    file (not collective: :meth:`CheckpointStore.verify` splits the files over the ranks)."""
    problems = []
    for rel, (size, digest) in sorted(meta.get("files", {}).items()):
        if file_owner(rel, world_size) != rank:
            continue
        f = Path(path) / rel
        if not f.is_file():
            problems.append(f"{f} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{f} has {f.stat().st_size} bytes, {META} says {size}")
        elif file_digest(f) != digest:
            problems.append(f"{f}: {CHECKSUM} differs from the one recorded at save (same size: contents changed)")
    return problems


def _disk_full(exc: BaseException) -> bool:
    """Whether a save failed for lack of space: ENOSPC/EDQUOT anywhere in the chain, or torch's
    zip writer's words for a short write (``unexpected pos``), or DCP's wrapped message."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left" in text or "unexpected pos" in text or "Disk quota exceeded" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else 0


@dataclass
class _Pending:
    future: Future  # resolves to this rank's file digests once its shards are written and hashed
    step: int
    tmp: Path
    meta: dict[str, Any]


class CheckpointStore:
    """Save, find, verify and load checkpoints of one run (methods are collective unless noted)."""

    def __init__(self, cfg: CheckpointConfig, root: Path, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.root = Path(root)
        self.log = log
        self.pending: _Pending | None = None
        self._pool: ThreadPoolExecutor | None = None

    # ---- finding ---------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The checkpoint ``latest`` points to, or None (not collective)."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        target = self.root / pointer.read_text().strip()
        if not target.is_dir():
            raise CorruptCheckpointError(f"{pointer} points to {target.name}, which does not exist")
        return target

    def verify(self, path: Path) -> list[str]:
        """Every problem of checkpoint ``path``: structure and sizes (every rank), checksums (each rank
        hashes 1/world of the files, the ones it wrote when the world is unchanged: ~1.3 GB per rank
        for 7B on 64 ranks, ~1 s at 1.2-1.6 GB/s plus the read). The same list on every rank."""
        rank, world_size = world()
        try:
            meta = read_meta(path)
            problems = verify_files(path, meta, rank, world_size)
            if rank == 0 and "files" not in meta:
                self.log(f"checkpoint: {path} records no checksums (written before they were); sizes checked only")
        except CorruptCheckpointError as exc:
            problems = [str(exc)]
        return sorted({p for ps in all_gather_object(problems) for p in ps})

    def start(self) -> Path | None:
        """Where this run starts: the checkpoint to resume (verified), or None for a fresh start.
        Checkpoints the run would overwrite are refused, archived or deleted (``on_existing``)."""
        resume = self.cfg.resume
        if resume == "none":
            chosen = None
        elif resume == "auto":
            chosen = self._newest_intact()
        else:
            chosen = Path(resume)
            if not chosen.is_dir():
                raise FileNotFoundError(f"resume_from / checkpoint.resume={resume!r}: no such checkpoint directory")
            if problems := self.verify(chosen):
                raise CorruptCheckpointError(f"checkpoint.resume={resume}: " + "; ".join(problems[:3])
                                             + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
        self._clear_the_way(chosen)
        return chosen

    def _candidates(self) -> list[Path]:
        """``latest`` first, then every older checkpoint by step, newest first (rank 0 reads the
        directory; every rank gets its answer)."""
        found: list[str] = []
        if world()[0] == 0:
            pointer, ckpts = self.root / LATEST, list_checkpoints(self.root)
            target = self.root / pointer.read_text().strip() if pointer.is_file() else None
            if target is not None and target.is_dir() and checkpoint_step(target) is not None:
                top = checkpoint_step(target)
                found = [target.name] + [p.name for p in reversed(ckpts) if checkpoint_step(p) < top]
            else:
                if target is not None:
                    self.log(f"checkpoint: {pointer} names {target.name}, which does not exist; "
                             "looking for the newest intact checkpoint")
                found = [p.name for p in reversed(ckpts)]
        return [self.root / name for name in broadcast_object(found)]

    def _newest_intact(self) -> Path | None:
        corrupt: list[Path] = []
        chosen = None
        for path in self._candidates():
            problems = self.verify(path)
            if not problems:
                chosen = path
                break
            corrupt.append(path)
            self.log(f"checkpoint: {path.name} is corrupt, not loaded: " + "; ".join(problems[:3]))
        if not corrupt:
            return chosen
        names = ", ".join(p.name for p in corrupt)
        if chosen is None:
            raise CorruptCheckpointError(
                f"{self.root}: no intact checkpoint ({names} are corrupt, reasons above); to start over keep "
                f"them with checkpoint.resume=none checkpoint.on_existing=archive")
        lost = f"steps {checkpoint_step(chosen) + 1}-{checkpoint_step(corrupt[0])}"
        self.log(f"checkpoint: falling back to {chosen.name}; {lost} are lost and will be trained again. "
                 f"The corrupt {names} are moved to {self.root / CORRUPT_DIR}/")
        if world()[0] == 0:
            (self.root / CORRUPT_DIR).mkdir(exist_ok=True)
            for path in corrupt:
                os.replace(path, _free_name(self.root / CORRUPT_DIR / path.name))
            self._point_latest(chosen)
        barrier()
        return chosen

    def _clear_the_way(self, chosen: Path | None) -> None:
        """Checkpoints this run would overwrite or prune (all of them for a fresh start; those past
        the resumed step otherwise) are refused, archived or deleted, per ``on_existing``."""
        in_root = chosen is not None and chosen.resolve().parent == self.root.resolve()
        top = checkpoint_step(chosen) if in_root else None
        if chosen is not None and not in_root:
            top = -1  # resuming another run's checkpoint into this root: everything here is in the way
        names: list[str] = []
        if world()[0] == 0:
            names = [p.name for p in list_checkpoints(self.root) if top is None or checkpoint_step(p) > top]
        names = broadcast_object(names)
        if not names:
            if in_root and world()[0] == 0 and not _points_to(self.root / LATEST, chosen):
                self._point_latest(chosen)  # `latest` was deleted, or named a corrupt checkpoint
            barrier()
            return
        what = "a fresh start" if chosen is None else f"resuming {chosen}"
        policy = self.cfg.on_existing
        if policy == "refuse":
            raise FileExistsError(
                f"{self.root} holds checkpoints {_span(names)} that {what} would overwrite; set "
                f"checkpoint.on_existing=archive (moves them to {self.root}/{ARCHIVE_PREFIX}<time>/), "
                f"=overwrite (deletes them), or use another run_dir")
        if world()[0] == 0:
            if policy == "archive":
                dest = _free_name(self.root / f"{ARCHIVE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}")
                dest.mkdir(parents=True)
                for name in names:
                    os.replace(self.root / name, dest / name)
                if chosen is None and (self.root / LATEST).is_file():
                    os.replace(self.root / LATEST, dest / LATEST)
                self.log(f"checkpoint: {what}; moved {_span(names)} to {dest} (checkpoint.on_existing=archive)")
            else:
                for name in names:
                    shutil.rmtree(self.root / name)
                if chosen is None:
                    (self.root / LATEST).unlink(missing_ok=True)
                self.log(f"checkpoint: {what}; deleted {_span(names)} (checkpoint.on_existing=overwrite)")
            if chosen is not None and in_root:
                self._point_latest(chosen)
        barrier()

    # ---- saving ----------------------------------------------------------------------------------
    def save(self, step: int, backend: Backend, meta: dict[str, Any], extra_files: list[Path] = ()) -> float:
        """Write checkpoint ``step``; ``extra_files`` (e.g. the tokenizer) are copied in so it stands alone.

        Returns the seconds training was blocked (with a synchronous save: writing plus hashing this
        rank's files, ~0.9 s per GB). With ``async_save`` the write and the hashing continue in the
        background and the checkpoint is finalized by a later :meth:`poll` or :meth:`wait`.
        """
        t0 = time.perf_counter()
        self.wait()  # at most one checkpoint in flight
        rank, world_size = world()
        tmp = self.root / f".tmp_{step_dirname(step)}"
        error: BaseException | None = None
        if rank == 0:
            try:
                if (self.root / step_dirname(step)).exists():
                    raise FileExistsError(f"{self.root / step_dirname(step)} exists; it is never overwritten")
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # a save of ours that a crash cut short
                tmp.mkdir()
                for f in extra_files:
                    shutil.copyfile(f, tmp / Path(f).name)
            except Exception as exc:  # noqa: BLE001 - reported by _agree_written on every rank
                error = exc
        self._agree_written(step, tmp, backend, error)
        rngs = all_gather_object(rng_state())
        full_meta = {**meta, "step": step, "world_size": world_size, "rng": rngs}
        if self.cfg.async_save:
            written = backend.save_async(tmp / STATE)
            self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash")
            digests = self._pool.submit(lambda: (written.result(), hash_own_files(tmp, rank, world_size))[1])
            self.pending = _Pending(digests, step, tmp, full_meta)
        else:
            try:
                backend.save(tmp / STATE)
                digests = hash_own_files(tmp, rank, world_size)
            except Exception as exc:  # noqa: BLE001 - reported by _agree_written on every rank
                error, digests = exc, {}
            self._agree_written(step, tmp, backend, error)
            self._finalize(step, tmp, full_meta, digests)
        return time.perf_counter() - t0

    def _agree_written(self, step: int, tmp: Path, backend: Backend, error: BaseException | None) -> None:
        """Every rank learns whether any rank failed; then the temporary directory is removed and every
        rank raises :class:`CheckpointWriteError` (the previous checkpoint and ``latest`` stay)."""
        if all_ranks_true(error is None):
            return
        rank, _ = world()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        if error is None:
            raise CheckpointWriteError(f"checkpoint step {step}: another rank failed to write {tmp} (its error is "
                                       f"above); removed it, {self._kept()}")
        if _disk_full(error):
            need, free = self._bytes_needed(backend), shutil.disk_usage(self.root).free
            raise CheckpointWriteError(
                f"checkpoint step {step}: disk full writing {tmp} ({free / 1e9:.2f} GB free, a checkpoint needs "
                f"about {need / 1e9:.2f} GB = {need} bytes); removed it, {self._kept()}. Free space or set "
                "checkpoint.dir to a larger filesystem") from error
        raise CheckpointWriteError(f"checkpoint step {step}: writing {tmp} failed ({type(error).__name__}: "
                                   f"{error}); removed it, {self._kept()}") from error

    def _kept(self) -> str:
        try:
            latest = self.latest()
        except CorruptCheckpointError:
            latest = None
        return f"{latest} is kept as latest" if latest else "no earlier checkpoint exists"

    def _bytes_needed(self, backend: Backend) -> int:
        """The size of the previous checkpoint; without one, 12 bytes per parameter (fp32 weights and
        AdamW's two moments, the floor of what the backend saves)."""
        with contextlib.suppress(CorruptCheckpointError):
            if (latest := self.latest()) is not None:
                return _dir_bytes(latest)
        model = getattr(backend, "model", None)
        n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) if model is not None else 0
        return 12 * n

    def poll(self) -> Path | None:
        """Finalize the in-flight async checkpoint if every rank has finished writing and hashing it."""
        if self.pending is None or not all_ranks_true(self.pending.future.done()):
            return None
        return self.wait()

    def wait(self, backend: Backend | None = None) -> Path | None:
        """Block until the in-flight async checkpoint is written and hashed, then finalize it."""
        if self.pending is None:
            return None
        p, self.pending = self.pending, None
        error, digests = None, {}
        try:
            digests = p.future.result()
        except Exception as exc:  # noqa: BLE001 - reported by _agree_written on every rank
            error = exc
        self._agree_written(p.step, p.tmp, backend, error)
        return self._finalize(p.step, p.tmp, p.meta, digests)

    def _finalize(self, step: int, tmp: Path, meta: dict[str, Any], digests: dict[str, list]) -> Path:
        """Gather every rank's digests (a few hundred bytes each), write ``meta.json``, rename the
        checkpoint into place, point ``latest`` at it and prune."""
        rank, _ = world()
        final = self.root / step_dirname(step)
        files = {k: v for d in all_gather_object(digests) for k, v in d.items()}  # every rank's shards are on disk
        if rank == 0:
            listed = _checkpoint_files(tmp)
            complete = set(files) == set(listed) and all(files[k][0] == (tmp / k).stat().st_size for k in listed)
            loss_finite = bool(meta.pop("loss_finite", True))
            meta = {**meta, "state_files": state_files(tmp / STATE), "checksum": CHECKSUM, "files": files,
                    "verified": complete and loss_finite}
            meta_tmp = tmp / f".{META}.tmp"
            meta_tmp.write_text(json.dumps(meta, indent=1))
            os.replace(meta_tmp, tmp / META)
            os.replace(tmp, final)
            self._point_latest(final)
            self._prune()
        barrier()
        return final

    def _point_latest(self, target: Path) -> None:
        pointer_tmp = self.root / f".{LATEST}.tmp"
        pointer_tmp.write_text(Path(target).name + "\n")
        os.replace(pointer_tmp, self.root / LATEST)

    def load(self, path: Path, backend: Backend) -> dict[str, Any]:
        """Load a checkpoint :meth:`start` chose (and verified) into ``backend``; restore the RNGs."""
        meta = read_meta(path)
        backend.load(Path(path) / STATE)
        rank, world_size = world()
        if meta.get("world_size") == world_size and meta.get("rng"):
            set_rng_state(meta["rng"][rank])
        return meta

    def _prune(self) -> None:
        """Delete checkpoints beyond ``keep_last`` by step number, except ``keep_every`` multiples,
        ``latest``'s target and the newest verified checkpoint (not collective: rank 0)."""
        if self.cfg.keep_last <= 0:
            return
        ckpts = list_checkpoints(self.root)
        keep = set(ckpts[-self.cfg.keep_last:])
        with contextlib.suppress(CorruptCheckpointError):
            if (latest := self.latest()) is not None:
                keep.add(latest)
        for path in reversed(ckpts):
            with contextlib.suppress(OSError, ValueError):
                if json.loads((path / META).read_text()).get("verified"):
                    keep.add(path)
                    break
        for old in ckpts:
            step = checkpoint_step(old)
            if old in keep or (self.cfg.keep_every and step % self.cfg.keep_every == 0):
                continue
            shutil.rmtree(old, ignore_errors=True)


def _free_name(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2``... whichever does not exist yet."""
    n, candidate = 0, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _points_to(pointer: Path, target: Path) -> bool:
    return pointer.is_file() and pointer.read_text().strip() == Path(target).name


def _span(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]} ({len(names)})"


class CheckpointState(Protocol):
    """What the checkpointer pulls from the trainer: small JSON-able run state, and its restore.
    ``check_resume(meta)`` (optional) refuses or warns about a checkpoint before any tensor is read."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, meta: dict[str, Any]) -> None: ...


class Checkpointer:
    """Owns *when* to checkpoint and pulls *what* from the trainer (torchtitan's pattern): the loop
    calls :meth:`step_end` after every step and :meth:`finish` once; nothing else saves."""

    def __init__(self, cfg: CheckpointConfig, root: Path, backend: Backend, state: CheckpointState,
                 extra_files: list[Path] = (), log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.manager = CheckpointStore(cfg, root, log=log)
        self.backend = backend
        self.state = state
        self.extra_files = list(extra_files)
        self.log = log
        self.last_saved_step: int | None = None
        self.last_checkpoint: Path | None = None

    def resume(self) -> dict[str, Any] | None:
        """Find and verify the checkpoint to start from (:meth:`CheckpointStore.start`), let the
        trainer check it against this run's config, then load it into the backend and the trainer."""
        path = self.manager.start()
        if path is None:
            return None
        meta = {**read_meta(path), "path": str(path)}
        if (check := getattr(self.state, "check_resume", None)) is not None:
            check(meta)
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
