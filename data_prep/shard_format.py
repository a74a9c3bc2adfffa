"""The shard format shared by prep (writer) and trainer (reader).

Each sample is one tar member ``<shard>-<index>.tokens.npy`` holding a 1-D array of ``block_size``
token ids. All members of a dataset have the same name length and byte size, so sample ``i`` of a
shard starts at byte ``i * record_bytes``: the trainer seeks straight to it, while plain
``webdataset.WebDataset`` and ``tar`` still read the file as an ordinary tar archive.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MEMBER_SUFFIX = "tokens.npy"
TAR_BLOCK = 512
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (halves shard size for vocabularies up to 65536)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def member_name(shard_index: int, sample_index: int) -> str:
    return f"{shard_index:06d}-{sample_index:09d}.{MEMBER_SUFFIX}"


def npy_bytes(block: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, block, allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class RecordLayout:
    """Byte layout of one sample inside a shard."""

    record_bytes: int  # tar header + padded payload
    npy_header_bytes: int  # .npy header inside the payload

    @classmethod
    def for_block(cls, block_size: int, dtype: np.dtype) -> RecordLayout:
        payload = len(npy_bytes(np.zeros(block_size, dtype=dtype)))
        header = payload - block_size * dtype.itemsize
        padded = -(-payload // TAR_BLOCK) * TAR_BLOCK
        return cls(record_bytes=TAR_BLOCK + padded, npy_header_bytes=header)


class ShardWriter:
    """Write fixed-size samples into one tar shard, deterministically (fixed mtime, owner, mode).

    The bytes are what ``tarfile`` (USTAR) writes, produced faster: every member has the same size
    and a name of the same length, so one header is built with ``tarfile`` and only its name and
    checksum are patched per member. The file is written under a temporary name and renamed on
    :meth:`close`.
    """

    def __init__(self, path: Path, shard_index: int, dtype: np.dtype) -> None:
        self.path = path
        self.shard_index = shard_index
        self.dtype = np.dtype(dtype)
        self.samples = 0
        self.tokens_per_source: dict[str, int] = {}
        self._tmp = path.with_name(path.name + ".tmp")
        self._fh = open(self._tmp, "wb")
        self._template: bytearray | None = None
        self._npy_header = b""
        self._pad = b""
        self._size = 0

    def _prepare(self, block: np.ndarray) -> None:
        payload = npy_bytes(block)
        self._npy_header = payload[: len(payload) - block.nbytes]
        self._size = len(payload)
        self._pad = b"\0" * (-self._size % TAR_BLOCK)
        info = tarfile.TarInfo(member_name(self.shard_index, 0))
        info.size = self._size
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._template = bytearray(info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape"))

    def _header(self, name: str) -> bytes:
        buf = self._template
        assert buf is not None
        raw = name.encode("ascii")
        buf[: len(raw)] = raw
        buf[148:156] = b"        "  # checksum is computed with its own field as spaces (POSIX)
        buf[148:155] = b"%06o\0" % sum(buf)
        return bytes(buf)

    def add(self, block: np.ndarray, tokens_per_source: dict[str, int]) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if self._template is None:
            self._prepare(block)
        self._fh.write(self._header(member_name(self.shard_index, self.samples)))
        self._fh.write(self._npy_header)
        self._fh.write(block.tobytes())
        self._fh.write(self._pad)
        self.samples += 1
        for src, n in tokens_per_source.items():
            self.tokens_per_source[src] = self.tokens_per_source.get(src, 0) + n

    def close(self, block_size: int) -> dict[str, Any]:
        """Finish the shard and return its manifest entry."""
        # End of archive as tarfile writes it: two zero blocks, then zeros up to a 10240-byte record.
        written = self.samples * (TAR_BLOCK + self._size + len(self._pad))
        end = written + 2 * TAR_BLOCK
        end += -end % tarfile.RECORDSIZE
        self._fh.write(b"\0" * (end - written))
        self._fh.close()
        os.replace(self._tmp, self.path)
        h = hashlib.sha256()
        with open(self.path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return {
            "name": self.path.name,
            "samples": self.samples,
            "tokens": self.samples * block_size,
            "bytes": self.path.stat().st_size,
            "sha256": h.hexdigest(),
            "tokens_per_source": dict(sorted(self.tokens_per_source.items())),
        }


class ShardReader:
    """Random access to samples of one shard by index (one positioned read; no scan from the start).

    The file is opened on :meth:`open` (or the first :meth:`read`) and stays open until :meth:`close`;
    a caller reading many shards keeps only a few readers alive (``TokenBlocks`` holds a small LRU).
    With ``expected_bytes`` (the manifest's ``bytes``), opening checks the file's size with one
    ``fstat``, so a missing or truncated shard fails on first use with a message naming
    ``manifest_path`` and the shard, instead of every rank stat-ing every shard at start-up.
    """

    def __init__(self, path: Path, shard_index: int, block_size: int, dtype: np.dtype, layout: RecordLayout,
                 expected_bytes: int | None = None, manifest_path: Path | str | None = None) -> None:
        self.path = Path(path)
        self.shard_index = shard_index
        self.block_size = block_size
        self.dtype = np.dtype(dtype)
        self.layout = layout
        self.expected_bytes = expected_bytes
        self.manifest_path = manifest_path
        self._fh: BinaryIO | None = None

    def open(self) -> ShardReader:
        if self._fh is not None:
            return self
        listed = (
            f"{self.manifest_path} lists {self.path.name}, which"
            if self.manifest_path is not None
            else f"shard {self.path.name}"
        )
        try:
            fh = open(self.path, "rb", buffering=0)
        except FileNotFoundError:
            raise FileNotFoundError(f"{listed} is missing (no file {self.path})") from None
        if self.expected_bytes is not None:
            size = os.fstat(fh.fileno()).st_size
            if size != self.expected_bytes:
                fh.close()
                what = "truncated" if size < self.expected_bytes else "not the file prep wrote"
                raise ValueError(f"{listed} should have {self.expected_bytes} bytes, but {self.path} has {size}: "
                                 f"shard {what} (re-copy it or re-run prep)")
        self._fh = fh
        return self

    def read(self, index: int) -> np.ndarray:
        if self._fh is None:
            self.open()
        assert self._fh is not None
        n = TAR_BLOCK + self.layout.npy_header_bytes + self.block_size * self.dtype.itemsize
        offset = index * self.layout.record_bytes
        # A positioned read: one syscall, and no shared file offset to race on (a forked process
        # holding a copy of this descriptor cannot move it under us).
        raw = os.pread(self._fh.fileno(), n, offset) if hasattr(os, "pread") else self._seek_read(offset, n)
        if len(raw) < n:
            raise ValueError(
                f"{self.path}: sample {index} ends at byte {offset + n}, past the end of the file; shard truncated"
            )
        name = raw[:100].rstrip(b"\0").decode("ascii", "replace")
        expected = member_name(self.shard_index, index)
        if name != expected:
            raise ValueError(
                f"{self.path}: sample {index} has member {name!r}, expected {expected!r}; "
                "shard corrupt or not of this manifest"
            )
        start = TAR_BLOCK + self.layout.npy_header_bytes
        return np.frombuffer(raw, dtype=self.dtype, count=self.block_size, offset=start)

    def _seek_read(self, offset: int, n: int) -> bytes:
        assert self._fh is not None
        self._fh.seek(offset)
        return self._fh.read(n)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __getstate__(self) -> dict:
        # File handles do not cross process boundaries (DataLoader workers reopen lazily).
        state = self.__dict__.copy()
        state["_fh"] = None
        return state


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of the shards at ``data_dir``: a local folder or an fsspec URL (``s3://…``)."""
    from data_prep import storage

    path = storage.join(data_dir, MANIFEST)
    try:
        text = storage.read_bytes(path).decode()
    except FileNotFoundError:
        raise FileNotFoundError(f"data.path={str(data_dir)!r}: no {MANIFEST} there (run slimpajama-prep first)") \
            from None
    except OSError as e:
        raise type(e)(f"data.path={str(data_dir)!r}: {e}") from None  # PermissionError stays one
    manifest = json.loads(text)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
    return manifest
