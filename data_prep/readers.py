"""Readers for JSON lines (plain, zstd, gzip or bzip2), JSON arrays, parquet and plain-text folders.

Bad input (invalid JSON or UTF-8, a lone surrogate escape such as ``"\\ud800"``, a missing or
non-string text field, an empty, truncated or unreadable file) is counted with file and line in
:class:`PrepStats`, never fatal: the rest of the file is kept. The kinds (drop reasons of the read
step) are in :data:`BAD_INPUT_KINDS`; a file that gives no document at all (garbage under a
``.jsonl`` name, a corrupt parquet file) is also listed as a bad file, with what went wrong.
Suffixes are matched case-insensitively; a file under an input directory (or matched by a glob)
whose suffix no reader handles is not read but returned by :func:`expand_inputs` in ``skipped``, and
the clean stage reports it.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import zstandard

from data_prep import storage
from data_prep.doc_pass import DocPass
from data_prep.document import Document
from data_prep.stats import PrepStats

_COMPRESSED = ("", ".zst", ".gz", ".bz2")
JSONL_SUFFIXES = tuple(".jsonl" + c for c in _COMPRESSED)
# ``.json`` files hold one JSON document per line or one JSON array of documents.
JSON_SUFFIXES = tuple(".json" + c for c in _COMPRESSED)
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt",)
SUFFIXES = JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES


# The read step's drop reasons, in the order the summaries list them, with what each means.
BAD_INPUT_KINDS = {
    "invalid_json": "invalid JSON",
    "invalid_utf8": "invalid UTF-8",
    "invalid_unicode": "lone UTF-16 surrogate escape",
    "missing_text": "missing or non-string text field",
    "truncated_file": "truncated compressed file (read up to the cut)",
    "undecodable_file": "undecodable compressed file (not zstd / gzip / bzip2 data)",
    "unreadable_parquet": "unreadable parquet file",
    "unreadable_file": "unreadable file (missing, permissions, I/O error)",
    "empty_file": "empty file",
    "unsupported_file": "no reader for the file name",
}


def has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    """Case-insensitive suffix test (``A.JSONL`` is a JSON-lines file)."""
    return path.name.lower().endswith(suffixes)


def expand_inputs(patterns: Iterable[str], root: Path | None = None, skipped: list[Path] | None = None) -> list[Path]:
    """Expand globs and directories into a sorted, de-duplicated list of readable files.

    Sorting makes the order of documents (and so every output) independent of the filesystem.
    Files found whose suffix no reader handles are appended (sorted) to ``skipped`` when given.
    """
    files: set[Path] = set()
    other: set[Path] = set()
    for pattern in patterns:
        relative = root is not None and not os.path.isabs(pattern) and not storage.is_remote(pattern)
        pat = storage.join(root, pattern) if relative else pattern
        if storage.is_remote(pat):  # objects: listed by the store (a folder: every object under it)
            found = storage.glob_files(pat)
            if not found:
                raise FileNotFoundError(f"prep.inputs: pattern {pattern!r} matches no object ({pat})")
            for q in found:
                (files if has_suffix(q, SUFFIXES) else other).add(q)
            continue
        matches = sorted(glob.glob(pat, recursive=True))
        if not matches:
            raise FileNotFoundError(f"prep.inputs: pattern {pattern!r} matches no file")
        for m in matches:
            p = Path(m)
            for q in (q for q in p.rglob("*") if q.is_file()) if p.is_dir() else (p,):
                (files if has_suffix(q, SUFFIXES) else other).add(q)
    if skipped is not None:
        skipped.extend(sorted(other - files, key=str))
    return sorted(files, key=str)


def skip_reason(path: Path) -> str:
    """Why :func:`expand_inputs` skipped ``path`` (the report lists it)."""
    return f"skipped: no reader for this file name (suffixes read: {', '.join(SUFFIXES)}, any case)"


class TruncatedFileError(OSError):
    """A compressed file ended in the middle of a frame."""


def _zst_lines(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a (multi-frame) zstd file. Unlike ``stream_reader``, which ends silently at a cut,
    this raises :class:`TruncatedFileError` when the data stops mid-frame, before yielding the partial line."""
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    pending = b""
    with path.open("rb") as fh:  # a local file, or an object streamed from the store (UPath)
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
    name = path.name.lower()
    if name.endswith(".zst"):
        yield from _zst_lines(path)
    elif name.endswith(".gz"):
        with path.open("rb") as raw, gzip.open(raw, "rb") as fh:
            yield from fh
    elif name.endswith(".bz2"):
        with path.open("rb") as raw, bz2.open(raw, "rb") as fh:
            yield from fh
    else:
        with path.open("rb") as fh:
            yield from fh


def get_field(record: dict[str, Any], dotted: str) -> Any:
    """Read ``a.b.c`` from nested dicts; None when any part is missing."""
    cur: Any = record
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _where(unit: str, k: int) -> str:
    """Prefix of an error message: an array element says which (its "line" in the report is ``k``)."""
    return "" if unit == "line" else f"{unit} {k}: "


class DocumentReader(DocPass):
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
        self._first_problem: str | None = None  # of the file being read

    def run(self, docs: Iterable[Document] = (), rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        # A reader creates documents, so only its output is counted.
        yield from self.stats.count(self.name, self.process(docs, rank, world_size), "out")

    def process(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
        for path in self.files[rank::world_size]:
            yield from self.read_file(path)

    def read_file(self, path: Path) -> Iterator[Document]:
        """Documents of one file; problems are recorded and reading stops only where the file does.
        A file that gives no document but had problems is recorded as a bad file, with its first one."""
        rel = storage.relative(path, self.root)
        before = dict(self.stats.reasons[self.name])
        self._first_problem = None
        docs = 0
        for doc in self._read_file(path, rel):
            docs += 1
            yield doc
        if docs == 0 and self._first_problem is not None:
            bad = {k: n - before.get(k, 0) for k, n in self.stats.reasons[self.name].items() if n > before.get(k, 0)}
            kinds = ", ".join(f"{k} {n}" for k, n in bad.items())
            self.stats.bad_file(rel, f"no document read ({kinds}); first: {self._first_problem}")

    def _read_file(self, path: Path, rel: str) -> Iterator[Document]:
        if has_suffix(path, PARQUET_SUFFIXES):
            yield from self._read_parquet(path, rel)
            return
        if has_suffix(path, TEXT_SUFFIXES):
            yield from self._read_text(path, rel)
            return
        lineno = 0
        try:
            lines = _lines(path)
            if has_suffix(path, JSON_SUFFIXES):
                lines = self._json_array_or_lines(lines, rel)
            for lineno, raw in enumerate(lines, start=1):
                if isinstance(raw, Document):  # an element of a JSON array
                    yield raw
                    continue
                doc = self._parse(raw, rel, lineno)
                if doc is not None:
                    yield doc
        except TruncatedFileError as exc:
            # Keep what was read; record where it broke.
            self._bad(rel, lineno + 1, "truncated_file", f"truncated: {exc}")
            return
        except (OSError, EOFError, zstandard.ZstdError) as exc:
            # An OSError with an errno is the file system's (missing, permissions, I/O); the rest
            # (zstd, gzip's BadGzipFile, bz2's "Invalid data stream", EOFError) is the data's.
            kind = "unreadable_file" if isinstance(exc, OSError) and exc.errno is not None else "undecodable_file"
            self._bad(rel, lineno + 1 if lineno else None, kind,
                      f"{kind.split('_')[0]}: {type(exc).__name__}: {exc}")
            return
        if lineno == 0:
            self._bad(rel, None, "empty_file", "empty file")

    def _json_array_or_lines(self, lines: Iterator[bytes], rel: str) -> Iterator[bytes | Document]:
        """Lines of a ``.json`` file, unless it holds one JSON array: then its documents, one per element
        (element ``k`` is "line" ``k`` of ids and errors). Anything else is read as JSON lines."""
        head: list[bytes] = []
        for line in lines:
            head.append(line)
            if line.strip():
                break
        if not head[-1:] or not head[-1].lstrip().startswith(b"["):
            yield from head
            yield from lines
            return
        data = b"".join([*head, *lines])
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._bad(rel, data.count(b"\n", 0, exc.start) + 1, "invalid_utf8", f"invalid utf-8: {exc}")
            yield b""  # counted: not an empty file
            return
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            self._bad(rel, exc.lineno, "invalid_json", f"invalid json array: {exc}")
            yield b""
            return
        if not records:
            return
        for k, record in enumerate(records, start=1):
            doc = self._document(record, rel, k, "element")
            yield doc if doc is not None else b""  # b"": counted already, keeps the numbering

    def _bad(self, rel: str, line: int | None, reason: str, message: str) -> None:
        if self._first_problem is None:
            self._first_problem = f"line {line}: {message}" if line else message
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
            pf = pq.ParquetFile(path if isinstance(path, Path) else path.open("rb"))  # an object: streamed
            top = self.text_key.split(".")[0]
            src_top = self.source_key.split(".")[0]
            cols = [c for c in dict.fromkeys([top, src_top]) if c in pf.schema_arrow.names]
            if top not in cols:
                self._bad(
                    rel, None, "missing_text", f"parquet file has no column {top!r} (prep.text_key={self.text_key!r})"
                )
                return
            for batch in pf.iter_batches(batch_size=1024, columns=cols):
                for record in batch.to_pylist():
                    row += 1
                    text = get_field(record, self.text_key)
                    if not isinstance(text, str):
                        self._bad(rel, row, "missing_text", f"field {self.text_key!r} missing or not a string")
                        continue
                    source = get_field(record, self.source_key)
                    yield Document(
                        id=f"{rel}:{row}", text=text, source=str(source) if source is not None else self.default_source
                    )
        except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) on corrupt files
            kind = "unreadable_file" if isinstance(exc, OSError) and exc.errno is not None else "unreadable_parquet"
            self._bad(rel, row + 1 if row else None, kind, f"unreadable: {type(exc).__name__}: {exc}")
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
        doc = self._document(record, rel, lineno)
        if doc is not None and (b"\\ud" in raw or b"\\uD" in raw) and not self._encodable(doc, rel, lineno):
            return None
        return doc

    def _document(self, record: Any, rel: str, lineno: int, unit: str = "line") -> Document | None:
        text = get_field(record, self.text_key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            self._bad(
                rel, lineno, "missing_text", f"{_where(unit, lineno)}field {self.text_key!r} missing or not a string"
            )
            return None
        source = get_field(record, self.source_key)
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        doc = Document(
            id=f"{rel}:{lineno}",
            text=text,
            source=str(source) if source is not None else self.default_source,
            meta=meta,
        )
        if unit != "line" and not self._encodable(doc, rel, lineno, unit):
            return None
        return doc

    def _encodable(self, doc: Document, rel: str, lineno: int, unit: str = "line") -> bool:
        """JSON can escape a lone UTF-16 surrogate (``"\\ud800"``), which no UTF-8 text holds: such a
        document is bad input (every later step encodes its text)."""
        for what, value in (("text", doc.text), ("source", doc.source)):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                self._bad(rel, lineno, "invalid_unicode",
                          f"{_where(unit, lineno)}lone surrogate {value[exc.start]!r} at character {exc.start} "
                          f"of the {what} field")
                return False
        return True


JsonlReader = DocumentReader  # the name earlier code and tests use
