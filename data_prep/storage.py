"""Locations that are either local paths or fsspec URLs (``s3://``, ``gs://``, ``az://``, ...).

Everything that takes a data, prep-output or checkpoint location goes through here, so that one
rule says what is remote and one place turns a client's exception into a message that names the URL
and the setting to fix. Credentials are never part of a location: they come from the client's own
environment and config files (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_PROFILE``,
``~/.aws``; ``GOOGLE_APPLICATION_CREDENTIALS``; ``AZURE_STORAGE_*``), as every tool of those clouds
reads them, and an S3-compatible endpoint from ``AWS_ENDPOINT_URL``. A URL that carries a secret
(``s3://KEY:SECRET@bucket``) is refused, so a location can be logged and written to ``config.json``
as it is.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
from pathlib import Path
from typing import Any

# "scheme://": a protocol fsspec resolves. file:// and local:// are local paths.
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_LOCAL_PROTOCOLS = ("file", "local")


def protocol(location: str | os.PathLike) -> str | None:
    """The URL scheme of ``location`` (``s3``, ``gs``, ...), or None for a local path."""
    m = _URL.match(str(location))
    return m.group(1).lower() if m else None


def is_remote(location: str | os.PathLike) -> bool:
    """True for an fsspec URL of anything but the local filesystem."""
    p = protocol(location)
    return p is not None and p not in _LOCAL_PROTOCOLS


def check_location(location: str | os.PathLike, key: str) -> str:
    """``location`` as a string, refused (naming ``key``) if it embeds credentials."""
    text = str(location)
    if is_remote(text) and "@" in text.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError(f"{key}: a URL with credentials in it ({protocol(text)}://…@…) would be logged and saved in "
                         "config.json; give them through the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                         "AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*) instead")
    return text


def join(location: str | os.PathLike, *names: str) -> str:
    """``location/names...``: ``/``-joined for a URL (``Path`` would fold ``s3://`` into ``s3:/``)."""
    text = str(location)
    if protocol(text) is None:
        return str(Path(text, *names))
    return posixpath.join(text.rstrip("/"), *names)


def filesystem(location: str | os.PathLike) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for ``location``; a clear error when the protocol's client
    package is not installed."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(location))
    except ImportError as e:
        raise ImportError(f"{location}: reading {protocol(location)}:// needs a client package that is not installed "
                          f"({e}); e.g. pip install 'slimpajama-pipeline[gcs]' for gs://, "
                          "'slimpajama-pipeline[azure]' for az://") from None


def describe_error(location: str, exc: BaseException) -> str:
    """What went wrong reading or writing ``location``, in words a user can act on."""
    if isinstance(exc, FileNotFoundError):
        return f"{location} does not exist"
    if isinstance(exc, PermissionError):
        return (f"{location}: access denied ({exc}); check the credentials in the environment "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE; AWS_ENDPOINT_URL for an S3-compatible store)")
    return f"{location}: {type(exc).__name__}: {exc}"


def exists(location: str | os.PathLike) -> bool:
    if not is_remote(location):
        return Path(str(location).removeprefix("file://")).exists()
    fs, path = filesystem(location)
    return fs.exists(path)


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole object or file at ``location``; raises ``FileNotFoundError``/``PermissionError``/
    ``OSError`` with :func:`describe_error`'s message."""
    if not is_remote(location):
        return Path(str(location).removeprefix("file://")).read_bytes()
    fs, path = filesystem(location)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(describe_error(str(location), e)) from None
    except PermissionError as e:
        raise PermissionError(describe_error(str(location), e)) from None
    except OSError as e:
        raise OSError(describe_error(str(location), e)) from e


def fetch_file(location: str, dest: Path, sha256: str | None = None) -> Path:
    """Copy the object at ``location`` to ``dest`` (a temporary name, then a rename: a reader of
    ``dest`` never sees part of it), checking ``sha256`` when given. Kept if already in place with
    that checksum."""
    dest = Path(dest)
    if dest.is_file() and (sha256 is None or file_sha256(dest) == sha256):
        return dest
    data = read_bytes(location)
    if sha256 is not None and (got := hashlib.sha256(data).hexdigest()) != sha256:
        raise ValueError(f"{location}: sha256 {got[:12]}…, expected {sha256[:12]}… (changed since it was recorded)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def as_path(location: str | os.PathLike) -> Any:
    """A pathlib-like object for ``location``: ``Path`` for a local path, a ``UPath`` (universal-pathlib:
    the pathlib API over fsspec, with ``name``, ``parent``, ``open``, ``stat``, ``read_bytes``) for a URL."""
    if not is_remote(location):
        return Path(str(location).removeprefix("file://"))
    from upath import UPath

    return UPath(str(location))


def relative(path: Any, root: Any) -> str:
    """``path`` relative to ``root`` (``/``-separated for a URL)."""
    if is_remote(str(path)):
        return str(path.relative_to(as_path(str(root))))
    return os.path.relpath(path, root)


def glob_files(pattern: str) -> list[Any]:
    """The files a URL glob (or a URL of a file or folder) names, every file under a matched folder,
    as ``UPath`` objects sorted by name."""
    fs, path = filesystem(pattern)
    proto = protocol(pattern)
    matches = fs.glob(path) if any(c in path for c in "*?[") else ([path] if fs.exists(path) else [])
    found: set[str] = set()
    for m in matches:
        found.update(fs.find(m) if fs.isdir(m) else [m])
    return [as_path(f"{proto}://{f}") for f in sorted(found)]


def fingerprint(path: Any, mode: str) -> list[int | str]:
    """What says an input object changed: ``[size, ETag]`` (or its modification time where the store
    has no ETag), or with ``mode="content"`` ``[size, sha256]`` of its bytes (read in full)."""
    info = path.fs.info(path.path)
    size = int(info.get("size") or 0)
    if mode == "content":
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
        return [size, digest.hexdigest()]
    return [size, str(info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or "")]


def put_file(local: Path, location: str) -> None:
    """Upload ``local`` to ``location`` in one request (S3, GCS and Azure make an object visible whole
    or not at all: a killed upload leaves nothing under the name)."""
    fs, path = filesystem(location)
    try:
        fs.put_file(str(local), path)
    except (FileNotFoundError, PermissionError) as e:
        raise type(e)(describe_error(location, e)) from None


def fetch_tree(location: str, dest: Path) -> Path:
    """Copy every object under the URL ``location`` to the local folder ``dest`` (a temporary folder
    beside it, then a rename: ``dest`` is whole or absent). Kept if ``dest`` is already there: what
    this fetches (a finished checkpoint or export) never changes under its name."""
    import shutil
    import tempfile

    dest = Path(dest)
    if dest.is_dir():
        return dest
    fs, path = filesystem(location)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{location}: no such folder (no object under it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for obj in fs.find(path):
            local = tmp / posixpath.relpath(obj, path.rstrip("/"))
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(obj, str(local))
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
