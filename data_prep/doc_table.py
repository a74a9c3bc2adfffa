"""The document table of a part: what the split, plan and report stages join on, in numbers only.

Written by the signatures stage (with dedup on or off), one row per clean document of the part in
key order, as a directory of ``.npy`` columns that readers memory-map and slice (a task that needs
the digests of a few thousand documents of another part reads those pages, not the part). About 43
bytes per document and no strings: a document's id is rebuilt from its key and the input file list
(:func:`doc_id`) only where one is written out; its source is an index into the part's ``sources``.
At 590 M documents in 64 parts a table is ~400 MB.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

LINE_BITS = 32  # key = file index << 32 | line (or row) within the file


@dataclass
class DocTable:
    """Columns (one row per document of the part, in key order).

    Attributes:
        key: input-order key, ``file index << 32 | line``.
        digest: 64-bit content hash of the text (exact duplicates share it).
        norm_digest: hash of the normalized word sequence (holdout hash decontamination).
        nbytes: UTF-8 size of the text.
        source: index into ``sources``.
        holdout_u: uniform [0, 1) from a hash of the document id (the holdout draws on it).
        contaminated: shares an n-gram with an evaluation example.
        sources: source names of this part, sorted.
    """

    key: np.ndarray
    digest: np.ndarray
    norm_digest: np.ndarray
    nbytes: np.ndarray
    source: np.ndarray
    holdout_u: np.ndarray
    contaminated: np.ndarray
    sources: list[str]

    def __len__(self) -> int:
        return len(self.key)

    def save(self, path: Path) -> None:
        """Write the columns into a temporary directory and rename it onto ``path`` (atomic)."""
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in COLUMNS:
            np.save(tmp / f"{name}.npy", getattr(self, name), allow_pickle=False)
        (tmp / "sources.json").write_text(json.dumps(self.sources))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, mmap: bool = False) -> DocTable:
        """All columns; with ``mmap`` they are memory-mapped (read lazily, page by page)."""
        cols = {name: column(path, name, mmap) for name in COLUMNS}
        return cls(**cols, sources=json.loads((path / "sources.json").read_text()))


class DocTableBuilder:
    """Collects a part's table batch by batch as numpy arrays (a Python number per document and
    column would cost ~300 bytes per document; this costs the table's ~43)."""

    def __init__(self) -> None:
        self._batches: list[dict[str, np.ndarray]] = []
        self._names: dict[str, int] = {}  # source name -> index in order of first appearance

    def add(self, key: np.ndarray, digest: np.ndarray, norm_digest: np.ndarray, nbytes: np.ndarray,
            source: list[str], holdout_u: np.ndarray, contaminated: np.ndarray | None = None) -> None:
        for name in set(source) - self._names.keys():
            if len(self._names) >= 65535:
                raise ValueError("over 65535 distinct sources in one part: does source_key name a per-document field?")
            self._names[name] = len(self._names)
        self._batches.append({
            "key": np.asarray(key, np.uint64), "digest": np.asarray(digest, np.uint64),
            "norm_digest": np.asarray(norm_digest, np.uint64), "nbytes": np.asarray(nbytes, np.int64),
            "source": np.fromiter((self._names[x] for x in source), np.uint16, len(source)),
            "holdout_u": np.asarray(holdout_u, np.float64),
            "contaminated": np.zeros(len(key), bool) if contaminated is None else np.asarray(contaminated, bool),
        })

    def finish(self) -> DocTable:
        dtypes = {"key": np.uint64, "digest": np.uint64, "norm_digest": np.uint64, "nbytes": np.int64,
                  "source": np.uint16, "holdout_u": np.float64, "contaminated": bool}
        cols = {c: np.concatenate([b[c] for b in self._batches]) if self._batches else np.zeros(0, t)
                for c, t in dtypes.items()}
        self._batches.clear()
        names = sorted(self._names)
        remap = np.zeros(max(len(self._names), 1), np.uint16)
        for k, name in enumerate(names):
            remap[self._names[name]] = k
        cols["source"] = remap[cols["source"]]
        return DocTable(**cols, sources=names)


def column(path: Path, name: str, mmap: bool = False) -> np.ndarray:
    """One column of the table at ``path``."""
    return np.load(path / f"{name}.npy", mmap_mode="r" if mmap else None)


COLUMNS = tuple(f.name for f in fields(DocTable) if f.name != "sources")


def part_of(keys: np.ndarray | int, num_parts: int) -> np.ndarray | int:
    """The part holding each key (part p holds input files p, p+n, ...)."""
    if isinstance(keys, np.ndarray):
        return ((keys >> np.uint64(LINE_BITS)) % np.uint64(num_parts)).astype(np.int64)
    return (keys >> LINE_BITS) % num_parts


def key_of(file_index: int, line: int) -> int:
    return (file_index << LINE_BITS) | line


def doc_id(key: int, files: list[str]) -> str:
    """The id of the document with ``key`` (``<relative file>:<line>``, as the readers name it)."""
    return f"{files[key >> LINE_BITS]}:{key & ((1 << LINE_BITS) - 1)}"
