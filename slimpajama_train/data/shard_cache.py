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

Not yet read by the loader (issue 22: the loader's remote path comes with it).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

LOCKS, TMP = ".locks", ".tmp"
# Written into a folder the cache starts in: eviction deletes files, so it only ever runs in a folder
# that holds nothing but what a cache put there.
MARKER = ".slimpajama_shard_cache"


class ShardFetchError(RuntimeError):
    """A shard could not be fetched whole and intact after every retry (the message names the URL)."""


class CacheFullError(RuntimeError):
    """The shards in use fill the cache: nothing can be evicted for the one asked for."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
        import fsspec

        self.source = str(source).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.source)
        self.dir = Path(cache_dir)
        if self.dir.is_dir() and any(self.dir.iterdir()) and not (self.dir / MARKER).is_file():
            raise ValueError(f"{self.dir} holds files and is not a shard cache: the cache evicts (deletes) files in "
                             "its folder, so name a new or empty folder for data.cache_dir")
        (self.dir / LOCKS).mkdir(parents=True, exist_ok=True)
        (self.dir / MARKER).touch()
        (self.dir / TMP).mkdir(exist_ok=True)
        self.limit_bytes, self.retries, self.backoff_s = int(limit_bytes), int(retries), float(backoff_s)
        self._fetch_file = fetch or (lambda url, dest: self.fs.get_file(url, str(dest)))
        self._pins: dict[str, int] = {}  # shard name -> fd of its lock file, held shared
        self._mutex = threading.Lock()
        self._prefetcher = ThreadPoolExecutor(prefetch_threads, thread_name_prefix="shard-prefetch")
        self.fetched = 0  # shards this process fetched (the others found them in place)

    def url(self, name: str) -> str:
        return f"{self.source}/{name}"

    def _lock_fd(self, name: str) -> int:
        return os.open(self.dir / LOCKS / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def use(self, name: str, size: int, sha256: str | None) -> Path:
        """The local path of shard ``name`` (fetched if absent), pinned until :meth:`release`."""
        with self._mutex:
            if name in self._pins:
                os.utime(self.dir / name)
                return self.dir / name
        fd = self._lock_fd(name)
        try:
            self._ensure(name, size, sha256, fd)
            fcntl.flock(fd, fcntl.LOCK_SH)  # from exclusive: not atomic, so look again
            while not (self.dir / name).is_file():
                self._ensure(name, size, sha256, fd)
                fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        os.utime(self.dir / name)  # least recently used: by mtime
        with self._mutex:
            self._pins[name] = fd
        return self.dir / name

    def release(self, name: str) -> None:
        with self._mutex:
            fd = self._pins.pop(name, None)
        if fd is not None:
            os.close(fd)  # drops the shared lock

    def prefetch(self, shards: list[tuple[str, int, str | None]]) -> list[Future]:
        """Fetch these (name, size, sha256) in the background, unpinned (eviction may take them again)."""
        def one(name: str, size: int, sha256: str | None) -> None:
            fd = self._lock_fd(name)
            try:
                self._ensure(name, size, sha256, fd)
            finally:
                os.close(fd)

        return [self._prefetcher.submit(one, *s) for s in shards]

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        for name in list(self._pins):
            self.release(name)

    # ---- fetching and eviction -----------------------------------------------------------------
    def _ensure(self, name: str, size: int, sha256: str | None, fd: int) -> None:
        """Under the shard's exclusive lock: fetch it unless it is in place, then evict down to the limit."""
        fcntl.flock(fd, fcntl.LOCK_EX)
        final = self.dir / name
        if final.is_file() and final.stat().st_size == size:
            return
        for stale in (self.dir / TMP).glob(f"{name}.*"):
            if not _alive(int(stale.suffix[1:])):
                stale.unlink(missing_ok=True)
        self._make_room(size, keep=name)
        tmp = self.dir / TMP / f"{name}.{os.getpid()}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                self._fetch_file(self.url(name), tmp)
                got = tmp.stat().st_size
                if got != size:
                    raise ShardFetchError(f"{self.url(name)}: {got} bytes fetched, the manifest says {size}")
                if sha256 is not None and (digest := _sha256(tmp)) != sha256:
                    raise ShardFetchError(f"{self.url(name)}: sha256 {digest[:12]}…, the manifest says {sha256[:12]}…")
                os.replace(tmp, final)
                self.fetched += 1
                return
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
