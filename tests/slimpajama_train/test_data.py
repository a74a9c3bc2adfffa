"""The global sample order: a function of (manifest, seed, epoch), not of ranks or workers."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from torch.utils.data import DataLoader

from data_prep.shard_format import (
    FORMAT_VERSION,
    MANIFEST,
    RecordLayout,
    ShardReader,
    ShardWriter,
    load_manifest,
    shard_name,
)
from slimpajama_train.data.dataset import DataConfig, TokenBlocks, open_dataset
from slimpajama_train.data.loader import RankBatchSampler, to_device_batch, train_loader, val_loader
from slimpajama_train.data.order import GlobalSampleOrder
from slimpajama_train.data.workers import ignore_preemption_signals, shut_down_workers
from tests.conftest import REPO
from tests.slimpajama_train.test_sample_order import NUMBERED_BLOCK, numbered_sample_ids, write_numbered_shards


def test_each_epoch_is_a_permutation_and_epochs_differ():
    order = GlobalSampleOrder([5, 7, 3], seed=1)
    e0 = [order.sample_id(p) for p in range(15)]
    e1 = [order.sample_id(p) for p in range(15, 30)]
    assert sorted(e0) == sorted(e1) == list(range(15)) and e0 != e1
    assert order.locate(0) == (0, 0) and order.locate(5) == (1, 0) and order.locate(14) == (2, 2)
    assert [GlobalSampleOrder([5, 7, 3], seed=1).sample_id(p) for p in range(15)] == e0


def _sequence(world: int, start: int, steps: int, G: int = 12, B: int = 2) -> list[list[int]]:
    """Positions of each global step, assembled from every rank's micro-batches."""
    per_rank = [iter(RankBatchSampler(start, G, B, r, world)) for r in range(world)]
    out = []
    for _ in range(steps):
        step = []
        for it in per_rank:
            for _ in range(G // world // B):
                step += next(it)
        out.append(step)
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 6])
def test_global_batches_do_not_depend_on_world_size(world):
    assert _sequence(world, 0, 5) == _sequence(1, 0, 5)


def test_resume_is_a_seek():
    assert _sequence(2, 36, 2) == _sequence(2, 0, 5)[3:]
    with pytest.raises(ValueError, match="global batch boundary"):
        RankBatchSampler(5, 12, 2, 0, 2)
    with pytest.raises(ValueError, match="not divisible"):
        RankBatchSampler(0, 12, 5, 0, 2)


def test_loader_reads_the_ordered_samples(demo_shards):
    cfg = DataConfig(path=str(demo_shards), micro_batch_size=4, num_workers=0)
    manifest, data_dir = open_dataset(cfg)
    loader = iter(train_loader(cfg, manifest, data_dir, start=0, global_batch=8, rank=0, world_size=1))
    batch = next(loader)
    assert batch.shape == (4, 65) and batch.dtype == torch.uint16  # (B, T+1), as stored
    x, y = to_device_batch(batch, torch.device("cpu"))
    assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # rank 1 of 2 reads exactly the second half of the same global batch
    r1 = iter(train_loader(cfg, manifest, data_dir, start=0, global_batch=8, rank=1, world_size=2))
    full = torch.cat([batch, next(loader)])
    assert torch.equal(next(r1), full[4:8])
    v = list(val_loader(cfg, manifest, data_dir, batches=2, global_batch=8, rank=0, world_size=1))
    assert len(v) == 4 and all(b.shape == (4, 65) and b.dtype == torch.uint16 and s.shape == (4,) for b, s in v)
    assert torch.equal(v[0][0], list(val_loader(cfg, manifest, data_dir, 2, 8, 0, 1))[0][0])
    # the same samples on 2 ranks: rank 1 holds the second half of each global batch
    v1 = list(val_loader(cfg, manifest, data_dir, batches=2, global_batch=8, rank=1, world_size=2))
    assert len(v1) == 2 and torch.equal(v1[0][0], v[1][0]) and torch.equal(v1[1][0], v[3][0])


def test_max_open_shards_is_validated():
    with pytest.raises(ValueError, match="data.max_open_shards=0"):
        DataConfig(max_open_shards=0)


def test_resume_at_sample_1e9_costs_what_a_fresh_start_costs(demo_shards, monkeypatch):
    """No per-epoch permutation to build and no replay: the first batch at sample 10**9 (thousands
    of epochs of the demo split) takes the same work as at sample 0: the same samples read and
    the same number of passes through the order's network per sample (counted, not timed)."""
    from slimpajama_train.data.dataset import TokenBlocks
    from slimpajama_train.data.order import KeyedBijection

    counts = {"passes": 0, "reads": 0}
    feistel, getitem = KeyedBijection._feistel, TokenBlocks.__getitem__

    def counted_feistel(self, x):
        counts["passes"] += 1
        return feistel(self, x)

    def counted_getitem(self, position):
        counts["reads"] += 1
        return getitem(self, position)

    monkeypatch.setattr(KeyedBijection, "_feistel", counted_feistel)
    monkeypatch.setattr(TokenBlocks, "__getitem__", counted_getitem)
    cfg = DataConfig(path=str(demo_shards), micro_batch_size=4, num_workers=0)
    manifest, data_dir = open_dataset(cfg)

    def first_batch_work(start: int) -> tuple[int, int, float]:
        counts.update(passes=0, reads=0)
        t0 = time.perf_counter()
        batch = next(iter(train_loader(cfg, manifest, data_dir, start, 8, 0, 1)))
        assert batch.shape[0] == 4
        return counts["reads"], counts["passes"], time.perf_counter() - t0

    reads0, passes0, t0 = first_batch_work(0)
    reads1e9, passes1e9, t1e9 = first_batch_work(10**9)
    print(f"first batch: at sample 0 {reads0} reads, {passes0} network passes ({t0 * 1e3:.2f} ms); "
          f"at sample 1e9 {reads1e9} reads, {passes1e9} passes ({t1e9 * 1e3:.2f} ms)")
    assert reads0 == reads1e9 == 4
    assert reads0 <= passes0 < 2 * 4 * reads0 and reads1e9 <= passes1e9 < 2 * 4 * reads1e9


class _CountingReader:
    """Stands in for a shard file: counts the readers open in this process (each worker has its own
    copy of these class attributes) and reads zeros."""

    open_now = 0
    max_open = 0

    def __init__(self, samples: int, block_size: int) -> None:
        cls = type(self)
        cls.open_now += 1
        cls.max_open = max(cls.max_open, cls.open_now)
        self.samples, self.block = samples, np.zeros(block_size, dtype=np.uint16)

    def read(self, index: int) -> np.ndarray:
        assert 0 <= index < self.samples
        return self.block

    def close(self) -> None:
        type(self).open_now -= 1


class _SyntheticShards(TokenBlocks):
    def open_shard(self, shard: int) -> _CountingReader:
        return _CountingReader(int(self.order.cum[shard + 1] - self.order.cum[shard]), self.block_size)


def _collate_with_worker_stats(samples):
    return torch.stack(samples), os.getpid(), _CountingReader.max_open, psutil.Process().memory_info().rss


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_workers_keep_few_shards_open_and_flat_memory_over_100k_shards(tmp_path):
    """SlimPajama-like split (100k shards of 4096 samples, 410M samples) read in the global random
    order through 4 workers: at most max_open_shards=16 files open per worker, and worker memory
    does not grow with the shards touched (nothing per shard is created on the way)."""
    shards = 100_000
    manifest = {
        "dtype": "uint16", "block_size": 65, "record": {"record_bytes": 1024, "npy_header_bytes": 128},
        "splits": {"train": {"shards": [{"name": f"train-{i:06d}.tar", "samples": 4096, "bytes": 4096 * 1024}
                                        for i in range(shards)]}},
    }
    ds = _SyntheticShards(tmp_path / "nowhere", manifest, "train", seed=1234, shuffle=True, max_open_shards=16)
    meta = ds.shard_names.nbytes + ds.shard_bytes.nbytes + ds.order.cum.nbytes
    print(f"per-shard metadata: {meta / shards:.1f} bytes/shard ({meta / 1e6:.2f} MB at {shards} shards)")
    assert meta / shards <= 40
    workers, warmup, batches = 4, 5, 150
    parent_rss = psutil.Process().memory_info().rss  # workers are forked from here
    loader = DataLoader(ds, batch_sampler=RankBatchSampler(10**9, 128, 128, 0, 1), num_workers=workers,
                        collate_fn=_collate_with_worker_stats, worker_init_fn=ignore_preemption_signals)
    stats: dict[int, list[tuple[int, int]]] = {}
    it = iter(loader)
    for _ in range(workers * (warmup + batches)):
        x, pid, max_open, rss = next(it)
        assert x.shape == (128, 65)
        stats.setdefault(pid, []).append((max_open, rss))
    del it
    assert len(stats) == workers and _CountingReader.open_now == 0  # the main process opened nothing
    print(f"main process RSS before the workers started: {parent_rss / 2**20:.1f} MiB")
    for pid, s in stats.items():
        max_open = max(m for m, _ in s)
        rss_warm, rss_end = s[warmup][1], s[-1][1]
        print(f"worker {pid}: {len(s)} batches ({len(s) * 128} samples), max {max_open} shards open, "
              f"RSS {rss_warm / 2**20:.1f} MiB after warm-up -> {rss_end / 2**20:.1f} MiB "
              f"(+{(rss_end - rss_warm) / 2**20:.2f})")
        assert max_open == 16  # filled up and evicted (a random order touches a new shard per sample)
        assert rss_end - rss_warm < 4 * 2**20
        assert rss_warm - parent_rss < 128 * 2**20  # a materialized permutation of the epoch alone: 3.3 GB
    assert sum(max(m for m, _ in s) for s in stats.values()) <= 64


# ---- open shard files: an LRU of max_open_shards per process, counted on real files ---------------
SHARD_BLOCK = 9


def _write_shards(out: Path, shards: int, samples: int) -> Path:
    """``shards`` real shards (prep's format) of ``samples`` samples each; sample ``i`` of shard ``s``
    holds ``[s, i, s, s, ...]``, so a row names the file and record it was read from."""
    out.mkdir(parents=True)
    dtype = np.dtype(np.uint16)
    entries = []
    for s in range(shards):
        writer = ShardWriter(out / shard_name("train", s), s, dtype)
        for i in range(samples):
            block = np.full(SHARD_BLOCK, s)
            block[1] = i
            writer.add(block, {"A": SHARD_BLOCK})
        entries.append(writer.close(SHARD_BLOCK))
    manifest = {"format_version": FORMAT_VERSION, "seq_len": SHARD_BLOCK - 1, "block_size": SHARD_BLOCK,
                "dtype": dtype.name, "record": asdict(RecordLayout.for_block(SHARD_BLOCK, dtype)),
                "tokenizer": {"file": "none", "sha256": "0" * 64, "vocab_size": 2**16},
                "splits": {"train": {"shards": entries}}}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


class _LoggedShards(TokenBlocks):
    """Real shard files; logs every reader opened and closed, in order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[str, int]] = []

    def open_shard(self, shard: int) -> ShardReader:
        reader = super().open_shard(shard)
        self.events.append(("open", shard))
        close = reader.close

        def logged_close() -> None:
            self.events.append(("close", shard))
            close()

        reader.close = logged_close
        return reader


def _lru_events(accesses: list[int], bound: int) -> list[tuple[str, int]]:
    """The opens and closes of a least-recently-used cache of ``bound`` readers over ``accesses``."""
    recent: list[int] = []  # least recent first
    events = []
    for s in accesses:
        if s in recent:
            recent.remove(s)
        else:
            if len(recent) == bound:
                events.append(("close", recent.pop(0)))
            events.append(("open", s))
        recent.append(s)
    return events


def test_open_shards_are_evicted_least_recently_used_first(tmp_path):
    """With the default bound (16), a shard read again stays open and the one unread the longest is
    closed: eviction in order of opening (FIFO) or at random gives other opens and closes."""
    data_dir = _write_shards(tmp_path / "shards", shards=40, samples=1)
    ds = _LoggedShards(data_dir, load_manifest(data_dir), "train", seed=0, shuffle=False)  # position = shard
    bound = DataConfig().max_open_shards
    assert ds.max_open_shards == bound == 16
    # Fill the cache, read shard 0 again, then a 17th shard: LRU closes 1 (FIFO would close 0). Then
    # a random walk with locality (hits and evictions interleaved): random eviction strays at once.
    rng = np.random.default_rng(0)
    accesses = [*range(bound), 0, bound, 0] + [int(s) for s in (np.cumsum(rng.integers(-6, 7, 3000)) % 40)]
    for s in accesses:
        assert ds[s][:2].tolist() == [s, 0]  # read from shard s's own file
    want = _lru_events(accesses, bound)
    got = ds.events
    first = next((k for k, (g, w) in enumerate(zip(got, want, strict=False)) if g != w), min(len(got), len(want)))
    assert got == want, f"event {first}: got {got[first:first + 2]}, LRU gives {want[first:first + 2]}"
    hits = len(accesses) - sum(e == "open" for e, _ in want)
    evictions = sum(e == "close" for e, _ in want)
    print(f"{len(accesses)} reads over 40 shards, bound {bound}: {hits} hits, {evictions} evictions, LRU order kept")
    assert hits > 500 and evictions > 500  # both paths exercised many times
    ds.close()
    assert len(ds.events) == len(want) + bound  # close() shuts the last 16


def _shard_fds(pid: int, data_dir: Path) -> int:
    """Descriptors of process ``pid`` that point at shard files of ``data_dir``."""
    fd_dir = Path(f"/proc/{pid}/fd")
    n = 0
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except FileNotFoundError:  # closed while we looked
            continue
        n += target.startswith(f"{data_dir}/train-") and target.endswith(".tar")
    return n


def _collate_with_fds(data_dir: Path, samples: list[torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    return torch.stack(samples), os.getpid(), _shard_fds(os.getpid(), data_dir)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_workers_keep_at_most_max_open_shards_files_open_over_1000_real_shards(tmp_path):
    """1,000 real shard files read in the global random order by 4 DataLoader workers: each worker's
    open shard descriptors (counted in /proc/<pid>/fd, inside the worker after each batch and from the
    main process while the workers run) stay within max_open_shards, though the main process holds 16
    open when the workers are forked (their copies are closed on the first read)."""
    shards, bound, workers, batches, B = 1000, 16, 4, 25, 32
    data_dir = _write_shards(tmp_path / "shards", shards, samples=4)
    ds = TokenBlocks(data_dir, load_manifest(data_dir), "train", seed=1234, shuffle=True, max_open_shards=bound)
    for p in range(64):  # the main process fills its own cache before the workers are forked
        ds[p]
    assert _shard_fds(os.getpid(), data_dir) == bound
    loader = DataLoader(ds, batch_sampler=RankBatchSampler(0, B, B, 0, 1), num_workers=workers,
                        collate_fn=partial(_collate_with_fds, data_dir), worker_init_fn=ignore_preemption_signals)
    inside: dict[int, list[int]] = {}
    outside: dict[int, list[int]] = {}
    totals = []
    touched: dict[int, set[int]] = {}
    it = iter(loader)
    for b in range(workers * batches):
        x, pid, fds = next(it)
        shard_index = [ds.order.locate(ds.order.sample_id(p)) for p in range(b * B, (b + 1) * B)]
        assert x[:, :2].tolist() == [list(si) for si in shard_index]  # the right record of the right file
        inside.setdefault(pid, []).append(fds)
        touched.setdefault(pid, set()).update(s for s, _ in shard_index)
        now = {w.pid: _shard_fds(w.pid, data_dir) for w in it._workers}
        for w, n in now.items():
            outside.setdefault(w, []).append(n)
        totals.append(sum(now.values()))
    it._shutdown_workers()
    assert len(inside) == workers
    for pid in inside:
        print(f"worker {pid}: {len(touched[pid])} shards touched, shard fds max {max(inside[pid])} after its "
              f"batches, max {max(outside[pid])} seen from the main process")
        assert max(inside[pid]) == bound  # full, and never more
        assert max(outside[pid]) <= bound
        assert len(touched[pid]) > 10 * bound  # far more shards than the cache holds: many evictions
    print(f"all workers together: max {max(totals)} shard fds (bound {workers} x {bound} = {workers * bound})")
    assert max(totals) <= workers * bound
    assert _shard_fds(os.getpid(), data_dir) == bound  # the main process's own, untouched
    ds.close()
    assert _shard_fds(os.getpid(), data_dir) == 0


def _signal_from_another_process(pids: list[int], *signals: int) -> None:
    # As slurmstepd / the kubelet do: a SIGTERM from the worker's own parent is the DataLoader
    # shutting it down, and is honoured.
    code = ("import os, sys\n"
            "for p in sys.argv[2:]:\n    for s in sys.argv[1].split(','):\n        os.kill(int(p), int(s))")
    subprocess.run([sys.executable, "-c", code, ",".join(str(int(s)) for s in signals), *map(str, pids)], check=True)


@pytest.mark.parametrize("split", ["train", "val"])
def test_loader_workers_survive_sigterm_and_sigusr1(demo_shards, split):
    cfg = DataConfig(path=str(demo_shards), micro_batch_size=2, num_workers=2)
    manifest, data_dir = open_dataset(cfg)
    if split == "train":
        loader = train_loader(cfg, manifest, data_dir, start=0, global_batch=4, rank=0, world_size=1)
        batches = iter(loader)
    else:  # a finite loader, iterated again and again (every evaluation) by the same persistent workers
        loader = val_loader(cfg, manifest, data_dir, batches=5, global_batch=4, rank=0, world_size=1)
        batches = (b for _ in range(6) for b, _ in loader)
    next(batches), next(batches)  # one batch from each worker: both have run their worker_init_fn
    it = loader._iterator
    workers = list(it._workers)
    assert {w.pid for w in workers} <= {c.pid for c in psutil.Process().children()}
    _signal_from_another_process([w.pid for w in workers], signal.SIGTERM, signal.SIGUSR1)
    time.sleep(0.5)
    for _ in range(25):  # well past the prefetched batches: the workers keep producing
        assert next(batches).shape == (2, 65)
    assert loader._iterator is it and all(w.is_alive() for w in workers)
    # ...and still stop on their parent's SIGTERM (Process.terminate), and when the DataLoader shuts them down
    workers[0].terminate()
    workers[0].join(10)
    assert workers[0].exitcode == 0
    it._shutdown_workers()
    assert not any(w.is_alive() for w in workers)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_process_holding_live_loader_workers_still_exits(demo_shards, start_method):
    """multiprocessing's exit handler SIGTERMs (from the parent) and joins the daemonic workers of a
    DataLoader iterator still alive at exit; a worker that ignored every SIGTERM would hang it. Here
    the workers of a train loader and of a validation loader (idle between evaluations, and in the
    middle of one)."""
    code = (
        "import multiprocessing, sys\n"
        "from slimpajama_train.data.dataset import DataConfig, open_dataset\n"
        "from slimpajama_train.data.loader import train_loader, val_loader\n"
        "multiprocessing.set_start_method(sys.argv[2])\n"
        "cfg = DataConfig(path=sys.argv[1], micro_batch_size=2, num_workers=2)\n"
        "m, d = open_dataset(cfg)\nloader = train_loader(cfg, m, d, 0, 4, 0, 1)\nit = iter(loader)\n"
        "next(it), next(it)\nval = val_loader(cfg, m, d, 2, 4, 0, 1)\nlist(val)\nnext(iter(val))\n"
        "print('read', flush=True)\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(demo_shards), start_method], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    print(f"{start_method}: exited with {proc.returncode} after {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0 and "read" in proc.stdout, proc.stderr


def _demo_copy(demo_shards: Path, dst: Path) -> tuple[Path, dict]:
    """The demo shards in a folder of their own, as symlinks (tests replace a link, never write through it)."""
    dst.mkdir()
    for f in demo_shards.iterdir():
        (dst / f.name).symlink_to(f)
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    return dst, manifest


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_short_shard_fails_on_first_read_naming_it(demo_shards, tmp_path, damage):
    data_dir, manifest = _demo_copy(demo_shards, tmp_path / "shards")
    victim = manifest["splits"]["train"]["shards"][1]
    (data_dir / victim["name"]).unlink()
    if damage == "truncated":
        (data_dir / victim["name"]).write_bytes((demo_shards / victim["name"]).read_bytes()[: victim["bytes"] // 2])
    cfg = DataConfig(path=str(data_dir), micro_batch_size=4, num_workers=0)
    loader = train_loader(cfg, *open_dataset(cfg), start=0, global_batch=4, rank=0, world_size=1)  # no stat of shards
    ds = loader.dataset
    pos = next(p for p in range(10_000) if ds.order.locate(ds.order.sample_id(p))[0] == 1)
    other = next(p for p in range(10_000) if ds.order.locate(ds.order.sample_id(p))[0] != 1)
    assert ds[other].shape == (65,)  # the rest of the split reads fine
    error = FileNotFoundError if damage == "missing" else ValueError
    with pytest.raises(error) as info:
        ds[pos]
    message = str(info.value)
    print(message)
    assert f"{data_dir}/manifest.json" in message and victim["name"] in message
    assert ("missing" if damage == "missing" else f"should have {victim['bytes']} bytes") in message


def _write_manifest(data_dir: Path, manifest: dict) -> None:
    (data_dir / "manifest.json").unlink()  # a link to the fixture's: replace, do not write through
    (data_dir / "manifest.json").write_text(json.dumps(manifest))


def test_token_id_past_the_vocabulary_names_the_shard_and_sample(demo_shards, tmp_path):
    """Ids at or past the manifest's vocabulary would index past the embedding (IndexError on CPU, a
    device-side assert on a GPU) or, below the model's vocabulary, be trained on silently."""
    data_dir, manifest = _demo_copy(demo_shards, tmp_path / "shards")
    manifest["tokenizer"]["vocab_size"] = 500  # the demo tokenizer has 1000 ids: most blocks hold ids >= 500
    _write_manifest(data_dir, manifest)
    cfg = DataConfig(path=str(data_dir), micro_batch_size=4, num_workers=0)
    loader = train_loader(cfg, *open_dataset(cfg), start=0, global_batch=4, rank=0, world_size=1)
    ds = loader.dataset
    with pytest.raises(ValueError) as info:
        next(iter(loader))
    message = str(info.value)
    print(message)
    shard, index = ds.order.locate(ds.order.sample_id(0))
    name = manifest["splits"]["train"]["shards"][shard]["name"]
    assert message.startswith(f"{data_dir / name}: sample {index} holds token id ")
    assert f"{data_dir}/manifest.json says the tokenizer has 500 ids" in message and "re-run prep" in message


@pytest.mark.parametrize("bad", ["../elsewhere/train-000000.tar", "/tmp/train-000000.tar", "a/../../x.tar"])
def test_shard_name_outside_the_data_folder_is_refused_when_the_manifest_is_read(demo_shards, tmp_path, bad):
    data_dir, manifest = _demo_copy(demo_shards, tmp_path / "shards")
    manifest["splits"]["train"]["shards"][3]["name"] = bad
    _write_manifest(data_dir, manifest)
    cfg = DataConfig(path=str(data_dir), micro_batch_size=4, num_workers=0)
    with pytest.raises(ValueError) as info:
        train_loader(cfg, *open_dataset(cfg), start=0, global_batch=4, rank=0, world_size=1)
    assert str(info.value).startswith(f"{data_dir}/manifest.json: shard name {bad!r} points outside {data_dir}")


def test_shards_symlinked_in_by_the_user_are_read(demo_shards, tmp_path):
    """A data folder whose shards are symlinks to a shared store is the user's layout, not an escape:
    only the manifest's names are checked."""
    data_dir, _ = _demo_copy(demo_shards, tmp_path / "shards")  # every shard a symlink out of the folder
    cfg = DataConfig(path=str(data_dir), micro_batch_size=4, num_workers=0, seed=0)
    ds = train_loader(cfg, *open_dataset(cfg), start=0, global_batch=4, rank=0, world_size=1).dataset
    start = int(ds.order.cum[2])
    position = next(p for p in range(ds.order.total) if ds.order.sample_id(p) == start)
    assert ds[position].shape == (65,)


# ---- batches as stored, one copy to the device -------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_batches_keep_the_stored_dtype_through_workers(tmp_path, dtype):
    """uint16 shards give uint16 batches, uint32 shards int32 ones (the same bytes: ids < 2**31),
    through the workers' shared memory too, with the ids intact (past 2**16 for uint32)."""
    data = write_numbered_shards(tmp_path / dtype, dtype, [6, 6], val=[4, 4])
    cfg = DataConfig(path=str(data), micro_batch_size=2, num_workers=1)
    manifest, data_dir = open_dataset(cfg)
    expect = torch.uint16 if dtype == "uint16" else torch.int32
    train = train_loader(cfg, manifest, data_dir, 0, 4, 0, 1)
    val = val_loader(cfg, manifest, data_dir, 2, 4, 0, 1)
    it = iter(train)
    seen = [next(it) for _ in range(3)]
    seen += [b for b, _ in val]
    for b in seen:
        assert b.dtype == expect and b.shape == (2, NUMBERED_BLOCK)
        numbered_sample_ids(b, dtype)
    if dtype == "uint32":
        assert min(int(b.long().min()) for b in seen) > 2**16
    shut_down_workers(train), shut_down_workers(val)


def test_to_device_batch_is_the_old_split_in_int64():
    blocks = {
        torch.uint16: torch.tensor([[0, 1, 65534, 65535, 7], [65535, 3, 2, 1, 0]], dtype=torch.uint16),
        torch.int32: torch.tensor([[0, 2**31 - 1, 70_000, 5, 6], [9, 8, 2**31 - 2, 1, 0]], dtype=torch.int32),
    }
    for dtype, b in blocks.items():
        inputs, targets = to_device_batch(b, torch.device("cpu"))
        wide = b.numpy().astype(np.int64)  # the old loader: int64 samples, split on the host
        old_inputs, old_targets = torch.from_numpy(wide[:, :-1].copy()), torch.from_numpy(wide[:, 1:].copy())
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.device.type == "cpu", dtype
        assert torch.equal(inputs, old_inputs) and torch.equal(targets, old_targets), dtype
        # views of one widened copy: one transfer moves both
        assert inputs.untyped_storage().data_ptr() == targets.untyped_storage().data_ptr()
        assert b.dtype == dtype  # the batch itself is left as it was


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b.clone(), s.clone()) for b, s in loader]


def test_val_loader_with_workers_gives_the_in_process_batches(demo_shards):
    """Validation reads through cfg.num_workers persistent workers: the same batches, in the same
    order, as in process, on every evaluation, by the same worker processes."""
    manifest, data_dir = open_dataset(DataConfig(path=str(demo_shards)))
    for rank, world in ((0, 1), (1, 2)):
        cfgs = [DataConfig(path=str(demo_shards), micro_batch_size=2, num_workers=n) for n in (0, 2)]
        plain, workers = (val_loader(c, manifest, data_dir, 3, 8, rank, world) for c in cfgs)
        expected = _batches(plain)
        assert len(expected) == 3 * 8 // world // 2
        first = _batches(workers)
        pids = [w.pid for w in workers._iterator._workers]
        again = _batches(workers)
        assert [w.pid for w in workers._iterator._workers] == pids and len(pids) == 2  # not forked again
        for got in (first, again):
            assert len(got) == len(expected)
            for (b, s), (eb, es) in zip(got, expected, strict=True):
                assert b.dtype == torch.uint16 and torch.equal(b, eb) and torch.equal(s, es)
        shut_down_workers(workers)
        assert workers._iterator is None and not any(psutil.pid_exists(p) and
                                                      psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                                      for p in pids)


def test_pin_memory_is_accepted_without_a_gpu(demo_shards):
    """The trainer passes pin_memory=(device is CUDA); asked for without CUDA it is dropped, without
    DataLoader's warning; with CUDA the batches come pinned."""
    manifest, data_dir = open_dataset(DataConfig(path=str(demo_shards)))
    for workers in (0, 1):
        cfg = DataConfig(path=str(demo_shards), micro_batch_size=4, num_workers=workers)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*pin_memory")  # DataLoader: no accelerator
            train = train_loader(cfg, manifest, data_dir, 0, 8, 0, 1, pin_memory=True)
            val = val_loader(cfg, manifest, data_dir, 2, 8, 0, 1, pin_memory=True)
            it = iter(train)
            got = [next(it), next(it)]
            got_val = _batches(val) if not torch.cuda.is_available() else [(b, s) for b, s in val]
        assert train.pin_memory == val.pin_memory == torch.cuda.is_available()
        assert all(b.is_pinned() == torch.cuda.is_available() for b in got + [b for b, _ in got_val])
        plain = iter(train_loader(cfg, manifest, data_dir, 0, 8, 0, 1))
        assert all(torch.equal(b, next(plain)) for b in got)
        assert all(torch.equal(b, e) for (b, _), (e, _) in zip(got_val, _batches(
            val_loader(cfg, manifest, data_dir, 2, 8, 0, 1)), strict=True))
        shut_down_workers(train), shut_down_workers(val)


# A process whose first loader worker hangs inside os.fork, as CPython gh-112275 makes one hang: the
# after-fork hook of the first child blocks before any Python code of the worker runs.
STUCK_FORK = """
import os, sys, threading
import torch
from slimpajama_train.data.dataset import DataConfig, open_dataset
from slimpajama_train.data.loader import train_loader
from slimpajama_train.data.workers import shut_down_workers, start_workers

forks = []
os.register_at_fork(before=lambda: forks.append(1),
                    after_in_child=lambda: len(forks) == 1 and threading.Event().wait())  # the first: for ever
cfg = DataConfig(path=sys.argv[1], micro_batch_size=2, num_workers=2)
manifest, data_dir = open_dataset(cfg)
loader = train_loader(cfg, manifest, data_dir, 16, 8, 1, 2)
it = start_workers(loader, timeout=float(sys.argv[2]))
pids = [w.pid for w in it._workers]
it = start_workers(loader, timeout=float(sys.argv[2]))  # workers up: reused, nothing waited for or killed
assert [w.pid for w in it._workers] == pids and all(w.is_alive() for w in it._workers)
got = [next(it) for _ in range(6)]
shut_down_workers(loader)
plain = iter(train_loader(DataConfig(path=sys.argv[1], micro_batch_size=2, num_workers=0), manifest, data_dir,
                          16, 8, 1, 2))
assert all(torch.equal(b, next(plain)) for b in got), "not the batches of a clean start"
print("forks", len(forks), "ok")
"""


def test_a_loader_worker_stuck_in_its_fork_is_forked_again(demo_shards):
    """start_workers (what the trainer starts its loaders with): the worker that never runs is
    killed after the timeout, the workers are forked again, and the batches are a clean start's.
    Without it (plain ``iter``) this process waits for its first batch for ever."""
    proc = subprocess.run([sys.executable, "-c", STUCK_FORK, str(demo_shards), "3"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["forks", "4", "ok"]  # 2 workers, the first stuck: 2 more
    (warning,) = [line for line in proc.stderr.splitlines() if line.startswith("warning: DataLoader worker")]
    assert "ran no Python code 3 s after their fork" in warning and "gh-112275" in warning and "(1/3)" in warning
