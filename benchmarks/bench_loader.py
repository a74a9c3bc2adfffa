"""What each sample order costs the loader and how well it mixes batches, measured in one run.

    python benchmarks/bench_loader.py --data data/demo_shards [--ks 1,4,16,64] [--samples 4096]
    python benchmarks/bench_loader.py --data data/demo_shards --moto   # also from a local S3 server
    python benchmarks/bench_loader.py --data /local/copy --url s3://bucket/shards   # your store
    python benchmarks/bench_loader.py --simulate-shards 75000 [--samples-per-shard 4096]

For ``data.order=global`` and ``data.order=blocks`` with each K of ``--ks``:

- **Local disk** (``--data``, a folder ``slimpajama-prep`` wrote): one loader process reads
  ``--samples`` consecutive positions of the order through ``TokenBlocks`` (an LRU of
  ``--max-open-shards`` open files, as a loader worker does): samples/s, shard opens per 1,000
  samples, bytes read per byte consumed (``os.pread`` counted, the per-open header reads included).
- **Object storage** (``--url``, or ``--moto``: ``--data`` uploaded to moto's S3 server on
  127.0.0.1): the same positions read through ``TokenBlocks`` from the URL via a cold node cache
  (``ShardCache``) of ``--cache-shards`` shards, the next block prefetched as in training: samples/s
  with the fetches, whole-shard requests per 1,000 samples, bytes fetched per byte consumed, and the
  cache hit rate (shard uses that found the shard in place).
- **Whole-shard fetches** (what object storage asks: a shard is fetched whole into a node's cache,
  evicted least-recently-used): the same positions' shards through an LRU of ``--cache-shards``
  shards, counting fetches: requests per 1,000 samples, bytes fetched per byte consumed, hit rate,
  and fetches per shard that was fetched at all over one whole epoch (the blocks order promises at
  most 1.1; past ``--epoch-limit`` samples, over the positions read). Counted from
  the order alone, so it also runs at SlimPajama's scale without files (``--simulate-shards``).
- **Mixing**, per global batch of ``--global-batch`` samples: each source's share (a sample counted
  as its shard's ``tokens_per_source`` mix) against the split's, the worst absolute deviation over
  sources, averaged and maxed over batches; distinct shards per batch; and the rank correlation of a
  sample's position in the epoch with its shard index.

Prints a table and, last, one JSON line. Speeds vary by machine (up to 3x); counts do not.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slimpajama_train.data.dataset import CacheSpec, TokenBlocks  # noqa: E402 - after the sys.path insert
from slimpajama_train.data.order import sample_order  # noqa: E402

# SlimPajama's token shares by source (the paper's table), for --simulate-shards.
SLIMPAJAMA_SHARES = {"CommonCrawl": 0.522, "C4": 0.267, "GitHub": 0.052, "Book": 0.042, "ArXiv": 0.046,
                     "Wikipedia": 0.038, "StackExchange": 0.033}


def shard_mix(shards: list[dict]) -> tuple[list[str], np.ndarray]:
    """Source names and, per shard, the share of its tokens from each (rows sum to 1)."""
    names = sorted({src for s in shards for src in s.get("tokens_per_source", {})}) or ["?"]
    mix = np.zeros((len(shards), len(names)))
    for i, s in enumerate(shards):
        per = s.get("tokens_per_source") or {"?": 1}
        total = sum(per.values())
        for src, n in per.items():
            mix[i, names.index(src)] = n / total
    return names, mix


def simulated_shards(n: int, samples_per_shard: int) -> list[dict]:
    """``n`` single-source shards in runs of one source each, sized by SlimPajama's shares: what a
    prep whose tasks each read one source's files writes (the case that mixes worst)."""
    shards, start = [], 0
    for k, (src, share) in enumerate(SLIMPAJAMA_SHARES.items()):
        count = n - start if k == len(SLIMPAJAMA_SHARES) - 1 else round(n * share)
        shards += [{"samples": samples_per_shard, "tokens_per_source": {src: samples_per_shard}}] * count
        start += count
    return shards


def write_simulated(folder: Path, shards: list[dict], seq_len: int = 128, vocab: int = 32000) -> Path:
    """Write ``shards`` (from :func:`simulated_shards`) as real shard files of random tokens, with a
    manifest the trainer's reader accepts: for reads from disk and from a store at any shard count."""
    from data_prep.shard_format import FORMAT_VERSION, MANIFEST, RecordLayout, ShardWriter, shard_name, token_dtype

    folder.mkdir(parents=True, exist_ok=True)
    dtype, block = token_dtype(vocab), seq_len + 1
    rng = np.random.default_rng(0)
    entries = []
    for i, s in enumerate(shards):
        writer = ShardWriter(folder / shard_name("train", i), i, dtype)
        src = next(iter(s["tokens_per_source"]))
        for _ in range(s["samples"]):
            writer.add(rng.integers(0, vocab, block, dtype=dtype), {src: block})
        entries.append(writer.close(block))
    manifest = {"format_version": FORMAT_VERSION, "dtype": np.dtype(dtype).name, "seq_len": seq_len,
                "block_size": block, "record": RecordLayout.for_block(block, np.dtype(dtype)).__dict__,
                "tokenizer": {"vocab_size": vocab, "sha256": "0" * 64, "file": "tokenizer.model"},
                "splits": {"train": {"shards": entries}, "val": {"shards": []}}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def shard_of(order, ids: np.ndarray) -> np.ndarray:
    return np.searchsorted(order.cum, ids, side="right") - 1


def fetches(shards: np.ndarray, cache_shards: int, n_shards: int) -> np.ndarray:
    """Per shard, how often the sequence fetches it whole through an LRU of ``cache_shards`` shards."""
    lru: OrderedDict[int, None] = OrderedDict()
    count = np.zeros(n_shards, dtype=np.int64)
    for s in shards.tolist():
        if s in lru:
            lru.move_to_end(s)
            continue
        count[s] += 1
        lru[s] = None
        if len(lru) > cache_shards:
            lru.popitem(last=False)
    return count


def mixing(order, mix: np.ndarray, start: int, n: int, global_batch: int) -> dict:
    ids = order.sample_ids(np.arange(start, start + n))
    shard = shard_of(order, ids)
    sample_mix = mix[shard]
    expected = (mix * np.diff(order.cum)[:, None]).sum(0) / order.total
    batches = sample_mix[: n // global_batch * global_batch].reshape(-1, global_batch, mix.shape[1]).mean(1)
    worst = np.abs(batches - expected).max(1)
    distinct = [len(np.unique(b)) for b in shard[: n // global_batch * global_batch].reshape(-1, global_batch)]
    rank_shard = np.argsort(np.argsort(shard, kind="stable"))  # Spearman: positions are already ranks
    return {"source_share_dev_mean": float(worst.mean()), "source_share_dev_max": float(worst.max()),
            "distinct_shards_per_batch": float(np.mean(distinct)),
            "position_shard_rank_corr": float(np.corrcoef(np.arange(n), rank_shard)[0, 1]) if n > 2 else 0.0}


def local_read(data: Path, manifest: dict, name: str, k: int | None, seed: int, samples: int,
               max_open: int) -> dict:
    """Read ``samples`` positions through TokenBlocks; opens and pread bytes counted."""
    ds = TokenBlocks(data, manifest, "train", seed, shuffle=True, max_open_shards=max_open, order=name,
                     block_shards=k or 1)
    counted = {"opens": 0, "bytes": 0}
    open_shard, pread = ds.open_shard, os.pread

    def counting_open(shard: int):
        counted["opens"] += 1
        return open_shard(shard)

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        counted["bytes"] += n
        return pread(fd, n, offset)

    ds.open_shard = counting_open
    os.pread = counting_pread
    try:
        consumed = 0
        t0 = time.perf_counter()
        for p in range(samples):
            consumed += ds[p].numel() * ds.dtype.itemsize
        dt = time.perf_counter() - t0
    finally:
        os.pread = pread
        ds.close()
    return {"samples_per_s": samples / dt, "opens_per_1k": 1000 * counted["opens"] / samples,
            "bytes_read_per_byte": counted["bytes"] / consumed}


def remote_read(url: str, manifest: dict, name: str, k: int | None, seed: int, samples: int, max_open: int,
                cache_dir: Path, cache_shards: int) -> dict:
    """Read ``samples`` positions through TokenBlocks from ``url`` via a cold node cache of
    ``cache_shards`` of the largest shards (the next block prefetched in the blocks order, as in
    training): samples/s with the fetches, whole-shard requests per 1,000 samples, bytes fetched per
    byte consumed, and the share of shard uses that found the shard in the cache."""
    shards = manifest["splits"]["train"]["shards"]
    limit = cache_shards * max(s["bytes"] for s in shards)
    spec = CacheSpec(str(cache_dir / f"{name}_{k}"), limit, retries=5, backoff_s=0.5)
    ds = TokenBlocks(url, manifest, "train", seed, shuffle=True, max_open_shards=max_open, order=name,
                     block_shards=k or 1, cache=spec)
    consumed = 0
    t0 = time.perf_counter()
    for p in range(samples):
        consumed += ds[p].numel() * ds.dtype.itemsize
    dt = time.perf_counter() - t0
    cache = ds._shard_cache()
    ds.close()  # waits for the prefetches in flight: their fetches count
    return {"remote_samples_per_s": samples / dt, "remote_requests_per_1k": 1000 * cache.fetched / samples,
            "remote_fetched_bytes_per_byte": cache.fetched_bytes / consumed,
            "remote_cache_hit_rate": cache.hits / max(cache.uses, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="a folder of shards with manifest.json (slimpajama-prep's output)")
    p.add_argument("--url", default=None, help="the same shards at an fsspec URL (s3://…): also read through a cache")
    p.add_argument("--moto", action="store_true", help="upload --data to a local S3 server (moto) and use it as --url")
    p.add_argument("--cache-dir", default=None, help="with --url: the cache folders (default: a temporary one)")
    p.add_argument("--simulate-shards", type=int, default=0, help="no files: this many simulated shards")
    p.add_argument("--samples-per-shard", type=int, default=4096, help="with --simulate-shards")
    p.add_argument("--write-shards", action="store_true",
                   help="with --simulate-shards: write them as files of random tokens (seq 128) and read those")
    p.add_argument("--ks", default="1,4,16,64", help="block sizes (shards) of the blocks order")
    p.add_argument("--samples", type=int, default=4096, help="positions read from the start of epoch 1")
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--max-open-shards", type=int, default=16)
    p.add_argument("--cache-shards", type=int, default=0, help="node cache in shards (default: 2 x the largest K)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--epoch-limit", type=int, default=5_000_000,
                   help="fetches per shard over a whole epoch up to this many samples, else over the window read")
    a = p.parse_args(argv)
    if bool(a.data) == bool(a.simulate_shards):
        p.error("give one of --data or --simulate-shards")
    written = None
    if a.write_shards and a.simulate_shards:
        a.data = written = str(write_simulated(Path(tempfile.mkdtemp(prefix="bench_loader_shards_")),
                                     simulated_shards(a.simulate_shards, a.samples_per_shard)))
        a.simulate_shards = 0
    if (a.url or a.moto) and not a.data:
        p.error("--url and --moto need --data (the local copy: its reads are the baseline)")
    ks = [int(k) for k in a.ks.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    server = None
    if a.moto:
        from tests.helpers.s3_server import S3Server

        server = S3Server(tmp / "moto_server.log")
        os.environ.update(server.env)
        server.make_bucket("bench")
        a.url = server.upload(Path(a.data), "s3://bench/shards")
    if a.data:
        data = Path(a.data)
        manifest = json.loads((data / "manifest.json").read_text())
        shards = manifest["splits"]["train"]["shards"]
        sample_bytes = manifest["record"]["record_bytes"]
    else:
        data, manifest = None, None
        shards = simulated_shards(a.simulate_shards, a.samples_per_shard)
        sample_bytes = 2049 * 2
    counts = [int(s["samples"]) for s in shards]
    shard_bytes = np.array([s.get("bytes", c * sample_bytes) for s, c in zip(shards, counts, strict=True)])
    names, mix = shard_mix(shards)
    cache = a.cache_shards or 2 * max(ks)
    total = sum(counts)
    start = total  # epoch 1: not the identity of an unshuffled start
    rows = {}
    for name, k in [("global", None), *(("blocks", k) for k in ks)]:
        label = "global" if k is None else f"blocks_k{k}"
        order = sample_order(name, counts, a.seed, k or 1)
        n = min(a.samples, total)
        shard = shard_of(order, order.sample_ids(np.arange(start, start + n)))
        fetched = fetches(shard, cache, len(shards))
        # Over a whole epoch where that is cheap to walk; past --epoch-limit samples, over the window read.
        walk = total if total <= a.epoch_limit else n
        per_shard = fetches(shard_of(order, order.sample_ids(np.arange(start, start + walk))), cache, len(shards))
        row = {"requests_per_1k": 1000 * int(fetched.sum()) / n,
               "fetched_bytes_per_byte": float((fetched * shard_bytes).sum()) / (n * sample_bytes),
               "cache_hit_rate": 1 - int(fetched.sum()) / n,
               "fetches_per_shard_epoch_mean": float(per_shard.sum() / max(np.count_nonzero(per_shard), 1)),
               "fetches_per_shard_epoch_max": int(per_shard.max()),
               **mixing(order, mix, start, n, a.global_batch)}
        if data is not None:
            row.update(local_read(data, manifest, name, k, a.seed, n, a.max_open_shards))
        if a.url:
            # The global order pins up to max_open_shards shards per process: no more than half the cache.
            # It fetches on most reads: 512 positions give its per-1,000 figures (minutes saved on a slow store).
            max_open = a.max_open_shards if k else min(a.max_open_shards, max(1, cache // 2))
            row.update(remote_read(a.url, manifest, name, k, a.seed, n if k else min(n, 512), max_open,
                                   Path(a.cache_dir) if a.cache_dir else tmp / "cache", cache))
        rows[label] = row
    if server is not None:
        server.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    if written:
        shutil.rmtree(written, ignore_errors=True)
    cols = ["samples_per_s", "opens_per_1k", "bytes_read_per_byte", "remote_samples_per_s", "remote_requests_per_1k",
            "remote_fetched_bytes_per_byte", "remote_cache_hit_rate", "requests_per_1k", "fetched_bytes_per_byte",
            "cache_hit_rate", "fetches_per_shard_epoch_mean", "source_share_dev_mean", "source_share_dev_max",
            "distinct_shards_per_batch", "position_shard_rank_corr"]
    cols = [c for c in cols if c in next(iter(rows.values()))]
    print(f"{len(shards)} shards, {total} samples; {a.samples} positions read; global batch {a.global_batch}; "
          f"cache {cache} shards; sources {', '.join(names)}")
    print(f"{'order':<12}" + "".join(f"{c[:14]:>15}" for c in cols))
    for label, row in rows.items():
        print(f"{label:<12}" + "".join(f"{row[c]:>15.3f}" for c in cols))
    result = {"data": str(data) if data else None, "url": a.url, "shards": len(shards), "samples": total,
              "read": a.samples, "global_batch": a.global_batch, "cache_shards": cache,
              "max_open_shards": a.max_open_shards, "ks": ks, "orders": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
