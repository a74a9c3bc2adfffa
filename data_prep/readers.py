"""Readers for jsonl / jsonl.zst / jsonl.gz, parquet and plain-text folders.

Bad input (invalid JSON or UTF-8, a missing or non-string text field, an empty, truncated or unreadable
file) is counted with file and line in :class:`PrepStats`, never fatal: the rest of the file is kept.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import zstandard

from data_prep.document import Document
from data_prep.stats import PrepStats
from data_prep.step import PipelineStep

JSONL_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".json.zst", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt",)
SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES


def expand_inputs(patterns: Iterable[str], root: Path | None = None) -> list[Path]:
    """Expand globs and directories into a sorted, de-duplicated list of readable files.

    Sorting makes the order of documents (and so every output) independent of the filesystem.
    """
    files: set[Path] = set()
    for pattern in patterns:
        pat = str(Path(root, pattern)) if root is not None and not os.path.isabs(pattern) else pattern
        matches = sorted(glob.glob(pat, recursive=True))
        if not matches:
            raise FileNotFoundError(f"prep.inputs: pattern {pattern!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                files.update(q for q in p.rglob("*") if q.is_file() and q.name.endswith(SUFFIXES))
            elif p.name.endswith(SUFFIXES):
                files.add(p)
    return sorted(files)


class TruncatedFileError(OSError):
    """A compressed file ended in the middle of a frame."""


def _zst_lines(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a (multi-frame) zstd file. Unlike ``stream_reader``, which ends silently at a cut,
    this raises :class:`TruncatedFileError` when the data stops mid-frame, before yielding the partial line."""
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    pending = b""
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            while block:
                pending += dobj.decompress(block)
                block = b""
                if dobj.eof and dobj.unused_data:  # next frame of a multi-frame file
                    block = dobj.unused_data
                    dobj = dctx.decompressobj()
            *lines, pending = pending.split(b"\n")
            yield from lines
    if not dobj.eof:
        raise TruncatedFileError(f"zstd data ends mid-frame ({path.stat().st_size} bytes)")
    if pending:
        yield pending


def _lines(path: Path) -> Iterator[bytes]:
    if path.name.endswith(".zst"):
        yield from _zst_lines(path)
    elif path.name.endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            yield from fh
    else:
        with open(path, "rb") as fh:
            yield from fh


def get_field(record: dict[str, Any], dotted: str) -> Any:
    """Read ``a.b.c`` from nested dicts; None when any part is missing."""
    cur: Any = record
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


class DocumentReader(PipelineStep):
    """Read documents from JSON-lines files (plain, zstd or gzip), parquet files and plain-text folders.

    Task ``rank`` of ``world_size`` reads files ``rank, rank + world_size, ...`` of the sorted list.
    """

    name = "read"

    def __init__(
        self,
        files: list[Path],
        root: Path,
        text_key: str = "text",
        source_key: str = "meta.redpajama_set_name",
        default_source: str = "unknown",
        stats: PrepStats | None = None,
    ) -> None:
        super().__init__(stats)
        self.files = files
        self.root = root
        self.text_key = text_key
        self.source_key = source_key
        self.default_source = default_source

    def run(self, docs: Iterable[Document] = (), rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        # A reader creates documents, so only its output is counted.
        yield from self.stats.count(self.name, self.process(docs, rank, world_size), "out")

    def process(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
        for path in self.files[rank::world_size]:
            yield from self.read_file(path)

    def read_file(self, path: Path) -> Iterator[Document]:
        """Documents of one file; problems are recorded and reading stops only where the file does."""
        rel = os.path.relpath(path, self.root)
        name = path.name
        if name.endswith(PARQUET_SUFFIXES):
            yield from self._read_parquet(path, rel)
            return
        if name.endswith(TEXT_SUFFIXES):
            yield from self._read_text(path, rel)
            return
        lineno = 0
        try:
            for lineno, raw in enumerate(_lines(path), start=1):
                doc = self._parse(raw, rel, lineno)
                if doc is not None:
                    yield doc
        except TruncatedFileError as exc:
            # Keep what was read; record where it broke.
            self._bad(rel, lineno + 1, "truncated_file", f"truncated: {exc}")
            return
        except (OSError, EOFError, zstandard.ZstdError) as exc:
            self._bad(rel, lineno + 1 if lineno else None, "unreadable_file", f"unreadable: {type(exc).__name__}: {exc}")
            return
        if lineno == 0:
            self._bad(rel, None, "empty_file", "empty file")

    def _bad(self, rel: str, line: int | None, reason: str, message: str) -> None:
        self.stats.error(rel, line, message)
        self.stats.drop(self.name, reason)

    def _read_text(self, path: Path, rel: str) -> Iterator[Document]:
        # A plain-text folder holds one document per file; its folder names the source.
        try:
            raw = path.read_bytes()
        except OSError as exc:
            self._bad(rel, None, "unreadable_file", f"unreadable: {type(exc).__name__}: {exc}")
            return
        if not raw.strip():
            self._bad(rel, None, "empty_file", "empty file")
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._bad(rel, 1, "invalid_utf8", f"invalid utf-8: {exc}")
            return
        yield Document(id=f"{rel}:1", text=text, source=path.parent.name or self.default_source)

    def _read_parquet(self, path: Path, rel: str) -> Iterator[Document]:
        import pyarrow.parquet as pq

        row = 0
        try:
            pf = pq.ParquetFile(path)
            top = self.text_key.split(".")[0]
            src_top = self.source_key.split(".")[0]
            cols = [c for c in dict.fromkeys([top, src_top]) if c in pf.schema_arrow.names]
            if top not in cols:
                self._bad(rel, None, "missing_text", f"parquet file has no column {top!r} (prep.text_key={self.text_key!r})")
                return
            for batch in pf.iter_batches(batch_size=1024, columns=cols):
                for record in batch.to_pylist():
                    row += 1
                    text = get_field(record, self.text_key)
                    if not isinstance(text, str):
                        self._bad(rel, row, "missing_text", f"field {self.text_key!r} missing or not a string")
                        continue
                    source = get_field(record, self.source_key)
                    yield Document(id=f"{rel}:{row}", text=text, source=str(source) if source is not None else self.default_source)
        except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) on corrupt files
            self._bad(rel, row + 1 if row else None, "unreadable_file", f"unreadable: {type(exc).__name__}: {exc}")
            return
        if row == 0:
            self._bad(rel, None, "empty_file", "empty file")

    def _parse(self, raw: bytes, rel: str, lineno: int) -> Document | None:
        if not raw.strip():
            return None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._bad(rel, lineno, "invalid_utf8", f"invalid utf-8: {exc}")
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            self._bad(rel, lineno, "invalid_json", f"invalid json: {exc}")
            return None
        text = get_field(record, self.text_key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            self._bad(rel, lineno, "missing_text", f"field {self.text_key!r} missing or not a string")
            return None
        source = get_field(record, self.source_key)
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        return Document(
            id=f"{rel}:{lineno}",
            text=text,
            source=str(source) if source is not None else self.default_source,
            meta=meta,
        )


JsonlReader = DocumentReader  # the name earlier code and tests use
