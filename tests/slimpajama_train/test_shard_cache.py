"""The node-local shard cache: each shard fetched once per node however many processes ask, checked
against the manifest, retried, never seen partial, evicted least recently used but never in use."""
import hashlib
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from slimpajama_train.data.shard_cache import CacheFullError, ShardCache, ShardFetchError


def _source(root: Path, n: int = 4, size: int = 1000) -> dict[str, tuple[int, str]]:
    root.mkdir(parents=True, exist_ok=True)
    shards = {}
    for i in range(n):
        data = bytes((i * 7 + j) % 251 for j in range(size))
        (root / f"train-{i:06d}.tar").write_bytes(data)
        shards[f"train-{i:06d}.tar"] = (size, hashlib.sha256(data).hexdigest())
    return shards


def _cached(cache: ShardCache) -> list[str]:
    """The shard names in the cache (their files carry a digest prefix: ``<sha16>-<name>``)."""
    return sorted(p.name.split("-", 1)[1] for _, _, p in cache.cached())


def _slow_fetch(url: str, dest: Path) -> None:
    time.sleep(0.3)  # a download takes a while: the others ask meanwhile
    dest.write_bytes(Path(url).read_bytes())


def _use_and_report(source: str, cache: str, name: str, size: int, sha: str, out: str) -> None:
    c = ShardCache(source, cache, limit_bytes=10_000, backoff_s=0.01, fetch=_slow_fetch)
    path = c.use(name, size, sha)
    Path(out).write_text(f"{c.fetched} {path.read_bytes() == (Path(source) / name).read_bytes()}")
    c.close()


def test_many_processes_fetch_a_shard_once_and_all_read_it_whole(tmp_path):
    shards = _source(tmp_path / "src")
    name, (size, sha) = next(iter(shards.items()))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_use_and_report, args=(str(tmp_path / "src"), str(tmp_path / "cache"), name, size,
                                                      sha, str(tmp_path / f"out{k}"))) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = [(tmp_path / f"out{k}").read_text().split() for k in range(4)]
    assert sorted(int(f) for f, _ in results) == [0, 0, 0, 1] and all(ok == "True" for _, ok in results)
    assert not list((tmp_path / "cache/.tmp").iterdir())


def test_a_truncated_or_corrupt_shard_is_retried_then_refused_naming_the_url(tmp_path):
    shards = _source(tmp_path / "src")
    name, (size, sha) = next(iter(shards.items()))
    cache = ShardCache(str(tmp_path / "src"), tmp_path / "cache", limit_bytes=10_000, retries=2, backoff_s=0.01)
    with pytest.raises(ShardFetchError, match=rf"src/{name}: not fetched whole and intact after 3 attempts.*"
                                              rf"{size} bytes fetched, the manifest says {size + 1}"):
        cache.use(name, size + 1, sha)  # the manifest's size differs: the object is truncated or replaced
    with pytest.raises(ShardFetchError, match="sha256"):
        cache.use(name, size, "0" * 64)
    assert _cached(cache) == [] and not list((tmp_path / "cache/.tmp").iterdir())
    with pytest.raises(ShardFetchError, match="no_such.tar does not exist"):
        cache.use("no_such.tar", 10, None)


def test_a_transient_failure_is_retried_with_backoff(tmp_path):
    shards = _source(tmp_path / "src")
    name, (size, sha) = next(iter(shards.items()))
    calls = []

    def flaky(url: str, dest: Path) -> None:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("endpoint down")
        dest.write_bytes(Path(url).read_bytes())

    cache = ShardCache(str(tmp_path / "src"), tmp_path / "cache", limit_bytes=10_000, backoff_s=0.05, fetch=flaky)
    assert cache.use(name, size, sha).read_bytes() == (tmp_path / "src" / name).read_bytes()
    assert len(calls) == 3 and calls[2] - calls[1] >= 0.09  # 0.05 s, then 0.1 s


def test_least_recently_used_is_evicted_but_never_a_shard_in_use(tmp_path):
    shards = _source(tmp_path / "src", n=4, size=1000)
    items = list(shards.items())
    cache = ShardCache(str(tmp_path / "src"), tmp_path / "cache", limit_bytes=2500, backoff_s=0.01)
    a, b, c, d = (name for name, _ in items)
    cache.use(a, *shards[a])  # pinned
    cache.use(b, *shards[b])
    cache.release(b, shards[b][1])
    os.utime(tmp_path / "cache" / ShardCache.local_name(b, shards[b][1]), (1, 1))  # b: least recently used
    cache.use(c, *shards[c])  # 3000 > 2500: b goes, a (older but pinned) stays
    assert _cached(cache) == sorted([a, c])
    with pytest.raises(CacheFullError, match="data.cache_limit_gb"):
        cache.use(d, *shards[d])  # a and c in use fill the cache
    cache.release(c, shards[c][1])
    cache.use(d, *shards[d])
    assert _cached(cache) == sorted([a, d])


def test_prefetch_fills_the_cache_in_the_background(tmp_path):
    shards = _source(tmp_path / "src", n=3)
    cache = ShardCache(str(tmp_path / "src"), tmp_path / "cache", limit_bytes=10_000, backoff_s=0.01)
    for f in cache.prefetch([(n, *v) for n, v in shards.items()]):
        f.result(timeout=30)
    assert cache.fetched == 3 and _cached(cache) == sorted(shards)
    cache.use(*next(iter((n, *v) for n, v in shards.items())))
    assert cache.fetched == 3  # found in place
    cache.close()


def test_a_killed_fetch_leaves_no_shard_under_its_name_and_its_leftover_is_cleared(tmp_path):
    """A fetch killed mid-way leaves only its temporary file (its pid in the name); the next fetch of
    that shard removes it once that process is gone, and nothing partial is ever at the final name."""
    shards = _source(tmp_path / "src")
    name, (size, sha) = next(iter(shards.items()))
    ctx = multiprocessing.get_context("fork")

    def killed_mid_fetch() -> None:
        def hang(url: str, dest: Path) -> None:
            dest.write_bytes(Path(url).read_bytes()[: size // 2])
            time.sleep(60)

        ShardCache(str(tmp_path / "src"), tmp_path / "cache", limit_bytes=10_000, fetch=hang).use(name, size, sha)

    p = ctx.Process(target=killed_mid_fetch)
    p.start()
    deadline = time.monotonic() + 30
    while not list((tmp_path / "cache/.tmp").glob(f"*{name}.*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    p.kill()
    p.join()
    assert [t.name for t in (tmp_path / "cache/.tmp").iterdir()] == [f"{ShardCache.local_name(name, sha)}.{p.pid}"]
    assert not (tmp_path / "cache" / ShardCache.local_name(name, sha)).exists()
    cache = ShardCache(str(tmp_path / "src"), tmp_path / "cache", limit_bytes=10_000, backoff_s=0.01)
    assert cache.use(name, size, sha).read_bytes() == (tmp_path / "src" / name).read_bytes()
    assert not list((tmp_path / "cache/.tmp").iterdir())


def test_a_folder_of_other_files_is_refused_and_left_as_it_was(tmp_path):
    """Eviction deletes files: a cache only starts in a new or empty folder, or one a cache made."""
    shards = _source(tmp_path / "src")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a shard cache: .* new or empty folder"):
        ShardCache(str(tmp_path / "src"), mine, limit_bytes=1)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    cache = ShardCache(str(tmp_path / "src"), tmp_path / "cache", limit_bytes=10_000)
    cache.use(*next(iter((n, *v) for n, v in shards.items())))
    ShardCache(str(tmp_path / "src"), tmp_path / "cache", limit_bytes=10_000)  # its own folder again: fine


def test_a_shard_prepared_again_with_the_same_name_and_size_is_fetched_again(tmp_path):
    """Prep's shards all have one size (a fixed record size): a dataset prepared again to the same
    location has the same names and sizes, so a cache keyed by name and size would hand out the old
    bytes. The digest in the cached name makes it fetch the new shard."""
    shards = _source(tmp_path / "src", n=1)
    name, (size, sha) = next(iter(shards.items()))
    cache = ShardCache(str(tmp_path / "src"), tmp_path / "cache", limit_bytes=10_000, backoff_s=0.01)
    old = cache.use(name, size, sha).read_bytes()
    cache.release(name, sha)
    new = bytes(255 - b for b in old)
    (tmp_path / "src" / name).write_bytes(new)
    assert cache.use(name, size, hashlib.sha256(new).hexdigest()).read_bytes() == new
    assert cache.fetched == 2


def test_a_shard_in_use_by_one_process_is_used_by_another_at_once(tmp_path):
    """Every rank of a node reads the same block: a shard another process holds (its shared pin)
    is handed out at once, not after that process lets it go (two caches on one folder stand for two
    processes: flock locks belong to each open of the lock file)."""
    import threading

    shards = _source(tmp_path / "src", n=1)
    name, (size, sha) = next(iter(shards.items()))
    first = ShardCache(str(tmp_path / "src"), tmp_path / "cache", limit_bytes=10_000, backoff_s=0.01)
    second = ShardCache(str(tmp_path / "src"), tmp_path / "cache", limit_bytes=10_000, backoff_s=0.01)
    first.use(name, size, sha)  # pinned, shared
    got = []
    t = threading.Thread(target=lambda: got.append(second.use(name, size, sha)), daemon=True)
    t.start()
    t.join(10)
    assert got and not t.is_alive(), "the second process waited for the first to release the shard"
    prefetched = second.prefetch([(name, size, sha)])[0]
    prefetched.result(timeout=10)  # in place: the prefetch does not wait for the pins either
    assert first.fetched + second.fetched == 1
    first.close()
    second.close()
