"""Atomic writes: every file a stage produces appears whole or not at all.

A task killed mid-write (SLURM preemption, OOM) leaves only a ``*.tmp*`` file behind, never a
truncated output that a later stage or a re-run would trust. Every writer in ``data_prep`` goes
through this module.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    The pid in the name keeps two processes that race on the same output (a requeued task and its
    zombie) from writing into one temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


class FileGroup:
    """Several files written under temporary names and renamed together by :meth:`commit`.

    Used where a task streams into many files at once (one bucket file per task): either all of
    them appear or none does.
    """

    def __init__(self) -> None:
        self._files: list[tuple[IO[bytes], Path, Path]] = []

    def open(self, path: Path) -> IO[bytes]:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        fh = open(tmp, "wb")  # noqa: SIM115 - closed by commit()
        self._files.append((fh, tmp, path))
        return fh

    def commit(self) -> None:
        for fh, _, _ in self._files:
            fh.close()
        for _, tmp, path in self._files:
            os.replace(tmp, path)
        self._files.clear()
