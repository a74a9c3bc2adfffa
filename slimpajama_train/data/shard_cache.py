"""A node-local cache of whole shards fetched from any fsspec location (``s3://``, ``gs://``, a path).

Every rank and loader worker of a node shares one cache folder. A shard is fetched whole, in one
request, to a temporary name, checked against the manifest (size, then sha256) and renamed into
place, so a reader never sees part of a shard and a killed fetch leaves only a temporary file (its
owner's pid in the name: removed by the next fetch of that shard once the owner is gone). Processes
coordinate through one lock file per shard (``flock``): a fetch holds it exclusively, so a shard is
fetched once however many processes ask; a process that uses a shard holds it shared until it
releases the shard, and eviction only takes shards whose lock it can get exclusively, so a shard in
use is never evicted. Eviction is least recently used (a use touches the file's mtime) and runs
after each fetch while the cache holds more than its limit.

A shard is kept under a name that carries the first 16 hex digits of its sha256
(``<sha>-train-000001.tar``): prep writes shards of equal size (a fixed record size), so a dataset
prepared again to the same URL has shards of the same names and sizes; with the digest in the name a
cache never hands out a shard of an earlier preparation, whose files age out by LRU.
"""
from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from data_prep.cli import UserError
from data_prep.storage import describe_error, file_sha256, filesystem

LOCKS, TMP = ".locks", ".tmp"
# Written into a folder the cache starts in: eviction deletes files, so it only ever runs in a folder
# that holds nothing but what a cache put there.
MARKER = ".slimpajama_shard_cache"


class ShardFetchError(UserError, RuntimeError):
    """A shard could not be fetched whole and intact after every retry (the message names the URL);
    the entry points print it in a line or two, without the traceback."""


class CacheFullError(UserError, RuntimeError):
    """The shards in use fill the cache: nothing can be evicted for the one asked for."""


def _present(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running
        pass
    return True


class ShardCache:
    """Whole shards of ``source`` (an fsspec URL or a local folder) in ``cache_dir``, at most
    ``limit_bytes`` of them beside the ones in use.

    ``use(name, size, sha256)`` returns the local path of the shard, fetched if absent, and pins it for
    this process until ``release(name)``; ``prefetch`` fetches in the background without pinning.
    Fetches are retried ``retries`` times with exponential backoff from ``backoff_s``."""

    def __init__(self, source: str, cache_dir: str | Path, limit_bytes: int, retries: int = 5,
                 backoff_s: float = 1.0, prefetch_threads: int = 2,
                 fetch: Callable[[str, Path], None] | None = None) -> None:
        self.source = str(source).rstrip("/")
        self.fs, self.root = filesystem(self.source)
        self.dir = Path(cache_dir)
        if self.dir.is_dir() and any(self.dir.iterdir()) and not (self.dir / MARKER).is_file():
            raise ValueError(f"{self.dir} holds files and is not a shard cache: the cache evicts (deletes) files in "
                             "its folder, so name a new or empty folder for data.cache_dir")
        # The marker before anything else: another process starting beside this one then never finds
        # the folder holding files without it.
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / MARKER).touch()
        (self.dir / LOCKS).mkdir(exist_ok=True)
        (self.dir / TMP).mkdir(exist_ok=True)
        self.limit_bytes, self.retries, self.backoff_s = int(limit_bytes), int(retries), float(backoff_s)
        self._fetch_file = fetch or (lambda url, dest: self.fs.get_file(url, str(dest)))
        self._pins: dict[str, int] = {}  # local name -> fd of its lock file, held shared
        self._mutex = threading.Lock()
        self._prefetcher = ThreadPoolExecutor(prefetch_threads, thread_name_prefix="shard-prefetch")
        self.fetched = 0  # shards this process fetched (the others found them in place)
        self.fetched_bytes = 0
        self.uses = self.hits = 0  # use() calls, and those that found the shard in place (fetched or prefetched)

    def url(self, name: str) -> str:
        return f"{self.source}/{name}"

    @staticmethod
    def local_name(name: str, sha256: str | None) -> str:
        """The file name of shard ``name`` in the cache: its digest's first 16 hex digits in front."""
        flat = name.replace("/", "__")  # a shard in a sub-folder of the data folder: one folder here
        return f"{sha256[:16]}-{flat}" if sha256 else flat

    def _lock_fd(self, name: str) -> int:
        return os.open(self.dir / LOCKS / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def use(self, name: str, size: int, sha256: str | None) -> Path:
        """The local path of shard ``name`` (fetched if absent), pinned until :meth:`release`."""
        local = self.dir / self.local_name(name, sha256)
        with self._mutex:
            if local.name in self._pins:
                os.utime(local)
                return local
        fd = self._lock_fd(local.name)
        try:
            # Shared first: a shard in place is used by many processes at once (every rank of the node
            # reads the same block); only a missing one needs the exclusive lock, to fetch it.
            fcntl.flock(fd, fcntl.LOCK_SH)
            self.uses += 1
            self.hits += _present(local, size)
            while not _present(local, size):
                self._ensure(name, size, sha256, fd)
                fcntl.flock(fd, fcntl.LOCK_SH)  # from exclusive: not atomic, so look again
        except BaseException:
            os.close(fd)
            raise
        os.utime(local)  # least recently used: by mtime
        with self._mutex:
            self._pins[local.name] = fd
        return local

    def release(self, name: str, sha256: str | None = None) -> None:
        """Unpin shard ``name`` (as :meth:`use` was called for it)."""
        with self._mutex:
            fd = self._pins.pop(self.local_name(name, sha256), None)
        if fd is not None:
            os.close(fd)  # drops the shared lock

    def prefetch(self, shards: list[tuple[str, int, str | None]]) -> list[Future]:
        """Fetch these (name, size, sha256) in the background, unpinned (eviction may take them again)."""
        def one(name: str, size: int, sha256: str | None) -> None:
            local = self.dir / self.local_name(name, sha256)
            fd = self._lock_fd(local.name)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)  # in place (maybe in use elsewhere): nothing to do
                if not _present(local, size):
                    self._ensure(name, size, sha256, fd)
            finally:
                os.close(fd)

        return [self._prefetcher.submit(one, *s) for s in shards]

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        with self._mutex:
            fds, self._pins = list(self._pins.values()), {}
        for fd in fds:
            os.close(fd)

    # ---- fetching and eviction -----------------------------------------------------------------
    def _ensure(self, name: str, size: int, sha256: str | None, fd: int) -> None:
        """Under the shard's exclusive lock: fetch it unless it is in place, then evict down to the limit."""
        fcntl.flock(fd, fcntl.LOCK_EX)
        final = self.dir / self.local_name(name, sha256)
        if _present(final, size):
            return
        for stale in (self.dir / TMP).glob(f"{final.name}.*"):
            if not _alive(int(stale.suffix[1:])):
                stale.unlink(missing_ok=True)
        self._make_room(size, keep=final.name)
        tmp = self.dir / TMP / f"{final.name}.{os.getpid()}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                self._fetch_file(self.url(name), tmp)
                got = tmp.stat().st_size
                if got != size:
                    raise ShardFetchError(f"{self.url(name)}: {got} bytes fetched, the manifest says {size}")
                if sha256 is not None and (digest := file_sha256(tmp)) != sha256:
                    raise ShardFetchError(f"{self.url(name)}: sha256 {digest[:12]}…, the manifest says {sha256[:12]}…")
                os.replace(tmp, final)
                with self._mutex:  # prefetch threads count too
                    self.fetched += 1
                    self.fetched_bytes += size
                return
            except (FileNotFoundError, PermissionError) as e:  # retrying will not make it appear or let us in
                tmp.unlink(missing_ok=True)
                raise ShardFetchError(describe_error(self.url(name), e)) from e
            except OSError as e:
                if e.errno == errno.ENOSPC:  # retrying will not make room
                    tmp.unlink(missing_ok=True)
                    raise CacheFullError(f"{self.dir}: no space left for {name} ({size} bytes) from "
                                         f"{self.url(name)}; free the disk or lower data.cache_limit_gb") from e
                last = e
            except Exception as e:  # noqa: BLE001 - any client's error: retried, then reported with the URL
                last = e
            tmp.unlink(missing_ok=True)
        raise ShardFetchError(f"{self.url(name)}: not fetched whole and intact after {self.retries + 1} attempts "
                              f"(last: {type(last).__name__}: {last})") from last

    def cached(self) -> list[tuple[float, int, Path]]:
        """(mtime, bytes, path) of every shard in the cache, least recently used first."""
        out = []
        for p in self.dir.iterdir():
            if p.is_file() and p.name != MARKER:
                st = p.stat()
                out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    def _make_room(self, size: int, keep: str) -> None:
        """Evict least recently used shards not in use until ``size`` more bytes fit under the limit."""
        shards = self.cached()
        used = sum(s for _, s, _ in shards)
        for _, nbytes, path in shards:
            if used + size <= self.limit_bytes:
                return
            if path.name == keep:
                continue
            fd = self._lock_fd(path.name)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # in use (pinned) or being fetched: never evicted
                os.close(fd)
                continue
            try:
                path.unlink(missing_ok=True)
                used -= nbytes
            finally:
                os.close(fd)
        if used + size > self.limit_bytes:
            raise CacheFullError(f"{self.dir}: {used} bytes of shards in use leave no room for {keep} ({size} bytes) "
                                 f"under the limit of {self.limit_bytes}; raise data.cache_limit_gb (a node needs "
                                 "its K shards in use and the ones prefetched)")

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a ShardCache holds locks and threads: build one per process")
