"""The training data as a map-style dataset: its config, the manifest checks, and the sample at
each position of the global order (:mod:`slimpajama_train.data.order`)."""
from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from data_prep import storage
from data_prep.shard_format import MANIFEST, RecordLayout, ShardReader, load_manifest
from slimpajama_train.data.order import ORDERS, BlockShuffledOrder, sample_order
from slimpajama_train.data.shard_cache import ShardCache

# Where shards fetched from a URL go when data.cache_dir is not set (node-local disk on most hosts).
DEFAULT_CACHE_DIR = os.path.join(tempfile.gettempdir(), "slimpajama_shard_cache")


@dataclass
class DataConfig:
    """Where the shards are and how they are read.

    Attributes:
        path: the folder with ``manifest.json`` and the shards (output of ``slimpajama-prep``): a local
            path, read in place, or any fsspec URL (``s3://bucket/shards``, ``gs://…``, ``az://…``), read
            through the node's shard cache. Credentials come from the environment (``storage``).
        seed: seeds the per-epoch permutation of samples.
        micro_batch_size: samples per rank per forward/backward.
        num_workers: DataLoader worker processes per rank.
        tokenizer_sha256: when set, the manifest's tokenizer must have this checksum.
        max_open_shards: shard files each loader process keeps open (an LRU); with a global random
            order every read may hit another shard, so this bounds file descriptors per worker. The
            blocks order keeps at least ``block_shards`` open (a block's shards are read together).
        allow_change: resume onto data whose manifest (``prep_config_hash``) or training order
            (``seed``, ``order``, ``block_shards``) differs from the checkpoint's (a warning instead of
            an error).
        order: ``global``, a seeded permutation of every sample of the split per epoch (any sample
            after any other: each read may open another shard); ``blocks``, the shards permuted per
            epoch and the samples shuffled within blocks of ``block_shards`` consecutive shards of that
            permutation (:class:`~slimpajama_train.data.order.BlockShuffledOrder`: K shards in use at a
            time). Either is a pure function of (manifest, seed, epoch[, K]): exact resume on any world
            size and worker count either way.
        block_shards: K, shards per block of the ``blocks`` order. 64: with prep's single-source shards
            a global batch's worst source share is off by 5.1 % on average (14.5 % at K=16; the global
            order 1.9 %: ``bench_loader`` at 75k shards), for 3 x 64 shards of node cache (~3.6 GB).
        cache_dir: the node-local folder of whole shards fetched from ``path``
            (:class:`~slimpajama_train.data.shard_cache.ShardCache`, shared by every rank and worker of
            the node); None: ``$TMPDIR/slimpajama_shard_cache`` for a URL, no cache for a local path.
            Set it for a local path too to copy shards from a shared filesystem to node disk once.
        cache_limit_gb: shards the cache keeps beside those in use (least recently used evicted). The
            ``blocks`` order needs ~3 blocks of shards (in use, prefetched, ranks at a boundary) plus
            the val split; the ``global`` order needs the whole train split (checked at start-up).
        fetch_retries: attempts after a failed or corrupt fetch, with exponential backoff from
            ``fetch_backoff_s`` seconds (5 and 1 s ride out ~30 s of a store not answering).
    """

    path: str = "data/demo_shards"
    seed: int = 1234
    micro_batch_size: int = 8
    num_workers: int = 1
    tokenizer_sha256: str | None = None
    max_open_shards: int = 16
    allow_change: bool = False
    order: str = "global"
    block_shards: int = 64
    cache_dir: str | None = None
    cache_limit_gb: float = 50.0
    fetch_retries: int = 5
    fetch_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        storage.check_location(self.path, "data.path")
        if self.micro_batch_size < 1:
            raise ValueError(f"data.micro_batch_size={self.micro_batch_size}: must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers}: must be >= 0")
        if self.max_open_shards < 1:
            raise ValueError(f"data.max_open_shards={self.max_open_shards}: must be >= 1")
        if self.order not in ORDERS:
            raise ValueError(f"data.order={self.order!r}: must be one of {', '.join(ORDERS)}")
        if self.block_shards < 1:
            raise ValueError(f"data.block_shards={self.block_shards}: must be >= 1")
        if self.cache_limit_gb <= 0:
            raise ValueError(f"data.cache_limit_gb={self.cache_limit_gb}: must be > 0")
        if self.fetch_retries < 0 or self.fetch_backoff_s < 0:
            raise ValueError(f"data.fetch_retries={self.fetch_retries}, data.fetch_backoff_s={self.fetch_backoff_s}: "
                             "must be >= 0")

    def cache_spec(self) -> CacheSpec | None:
        """The shard cache to read through: for a URL always, for a local path when ``cache_dir`` is set."""
        if self.cache_dir is None and not storage.is_remote(self.path):
            return None
        return CacheSpec(self.cache_dir or DEFAULT_CACHE_DIR, int(self.cache_limit_gb * 2**30), self.fetch_retries,
                         self.fetch_backoff_s)


@dataclass(frozen=True)
class CacheSpec:
    """How to build a process's :class:`ShardCache` (the cache itself holds locks and threads, so
    each loader process builds its own from this)."""

    dir: str
    limit_bytes: int
    retries: int = 5
    backoff_s: float = 1.0

    def build(self, source: str) -> ShardCache:
        return ShardCache(source, self.dir, self.limit_bytes, retries=self.retries, backoff_s=self.backoff_s)


class TokenBlocks(Dataset):
    """Map-style dataset: item ``position`` is the sample at that position of the global order.

    Per shard it keeps only metadata in arrays (name, size in bytes, sample offset: 32 bytes with
    prep's ``train-000000.tar`` names, 2.4 MB at 75k shards) and opens shards lazily, keeping at
    most ``max_open_shards`` open in an LRU per process (each DataLoader worker has its own). Nothing is
    opened or stat-ed at construction: a missing or truncated shard fails when first read, naming
    ``manifest.json`` and the shard.

    With ``cache`` (a URL ``data_dir``, or ``data.cache_dir`` set) a shard is read from the node's
    :class:`ShardCache`: fetched whole on first use, pinned while its reader is open, and in the
    ``blocks`` order the next block's shards are prefetched when a process enters a block. Per shard
    this adds its sha256 (32 bytes: 2.4 MB at 75k shards); nothing grows with the samples.

    Checks, priced for 75k shards and every sample read:

    - Shard names must stay inside ``data_dir`` (no absolute path, no ``..``), checked when the
      manifest is read with string tests per name, no filesystem call. See :func:`check_shard_names`.
    - Every sample's token ids must be below the manifest's ``tokenizer.vocab_size``, checked on each
      read, before the sample reaches a batch: a max over the block just read (~1-3 µs per sample;
      DESIGN.md). An id past the vocabulary would index past the embedding table (an ``IndexError``
      on CPU, a device-side assert on a GPU), and an id between the tokenizer's and the model's
      vocabulary would be trained on silently.
    """

    def __init__(self, data_dir: str | Path, manifest: dict[str, Any], split: str, seed: int, shuffle: bool,
                 max_open_shards: int = 16, with_source: bool = False, order: str = "global",
                 block_shards: int = 64, cache: CacheSpec | None = None) -> None:
        entry = manifest["splits"].get(split)
        if not entry or not entry["shards"]:
            raise ValueError(f"{data_dir}: manifest has no {split!r} shards")
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards={max_open_shards}: must be >= 1")
        if storage.is_remote(data_dir) and cache is None:
            raise ValueError(f"{data_dir}: shards at a URL are read through a shard cache (data.cache_dir)")
        shards = entry["shards"]
        self.data_dir = str(data_dir)
        self.manifest_path = storage.join(self.data_dir, MANIFEST)
        self.dtype = np.dtype(manifest["dtype"])
        # What items hold: the stored dtype, except uint32 as int32 (the same bytes; token ids are
        # < 2**31): torch's uint32 is a "barebones" dtype with few ops, where int32 has them all.
        # uint16 is one too, but stack, pinning, copies and ``.long()`` (CPU and CUDA) take it.
        self.item_dtype = np.dtype(np.int32) if self.dtype == np.uint32 else self.dtype
        vocab = manifest.get("tokenizer", {}).get("vocab_size", 0)
        if self.dtype == np.uint32 and vocab > 2**31:
            raise ValueError(f"{self.manifest_path}: a vocabulary of {vocab} ids does not fit int32 batches")
        self.layout = RecordLayout(**manifest["record"])
        self.block_size = int(manifest["block_size"])
        # In the blocks order a block's K shards are read together: an LRU smaller than K would reopen
        # shards on most reads (bench_loader at K=64 with 16 open: 722 opens per 1,000 samples, half
        # the samples/s of K=16), so it keeps at least K open.
        self.max_open_shards = max(max_open_shards, block_shards) if order == "blocks" else max_open_shards
        counts = [s["samples"] for s in shards]
        self.order = sample_order(order, counts, seed, block_shards, shuffle)
        # Ids at or past the tokenizer's vocabulary are refused on read (0: no vocabulary recorded).
        self.vocab_size = int(vocab)
        check_shard_names(self.data_dir, [s["name"] for s in shards], self.manifest_path)
        # No manifest dicts, Path or reader objects per shard: fixed-width name bytes and sizes.
        self.shard_names = np.array([s["name"].encode() for s in shards], dtype=np.bytes_)
        self.shard_bytes = np.array([s["bytes"] for s in shards], dtype=np.int64)
        self.cache_spec = cache
        self.shard_sha = (np.array([bytes.fromhex(s["sha256"]) for s in shards], dtype="S32")
                          if cache is not None else None)
        self._cache: ShardCache | None = None  # built in the process that reads (see _shard_cache)
        self._prefetched: tuple[int, int] | None = None  # the (epoch, block) whose next block was asked for
        # With ``with_source`` an item is (tokens, source index): the source of a shard that holds one
        # source (prep writes validation shards that way), -1 for a mixed shard.
        self.with_source = with_source
        self.sources, self.shard_source = shard_sources(shards)
        self._open: OrderedDict[int, Any] = OrderedDict()  # shard -> open reader, least recent first
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.order.total

    def open_shard(self, shard: int) -> ShardReader:
        """An open reader of ``shard`` (anything with ``read(index)`` and ``close()``); raises if the
        shard is missing or its size differs from the manifest's. Tests override it."""
        name = self.shard_names[shard].decode()
        path: str | Path = storage.join(self.data_dir, name)
        if self.cache_spec is not None:
            path = self._shard_cache().use(name, int(self.shard_bytes[shard]), self._sha(shard))
        return ShardReader(path, shard, self.block_size, self.dtype, self.layout,
                           expected_bytes=int(self.shard_bytes[shard]), manifest_path=self.manifest_path).open()

    def _sha(self, shard: int) -> str | None:
        return self.shard_sha[shard].hex() if self.shard_sha is not None else None

    def _shard_cache(self) -> ShardCache:
        if self._cache is None:
            assert self.cache_spec is not None
            self._cache = self.cache_spec.build(self.data_dir)
        return self._cache

    def _drop(self, shard: int, reader: Any) -> None:
        reader.close()
        if self._cache is not None:
            self._cache.release(self.shard_names[shard].decode(), self._sha(shard))

    def _reader(self, shard: int) -> Any:
        if self._pid != os.getpid():
            # A forked worker inherited the parent's descriptors: close its copies (the parent's stay
            # open) so that each process holds at most max_open_shards. The parent's cache (its locks,
            # mutex and threads) is the parent's: this process builds its own. Closing the inherited
            # lock descriptors leaves the parent's pins held (a flock belongs to the open file).
            for r in self._open.values():
                r.close()
            if self._cache is not None:
                for fd in self._cache._pins.values():
                    os.close(fd)
            self._open, self._cache, self._prefetched = OrderedDict(), None, None
            self._pid = os.getpid()
        r = self._open.get(shard)
        if r is not None:
            self._open.move_to_end(shard)
            return r
        while len(self._open) >= self.max_open_shards:
            self._drop(*self._open.popitem(last=False))
        r = self._open[shard] = self.open_shard(shard)
        return r

    def _enter_block(self, position: int) -> None:
        """In the ``blocks`` order, on entering a block: let go of the earlier block's shards (a
        process reads its positions in increasing order, so it never returns to them: the cache may
        evict them) and fetch the next block's shards in the background. A process thus pins at most
        K shards, and a node's cache holds the block in use, the one before it (ranks of a global
        batch on both sides of a boundary) and the one prefetched: ``check_cache_fits``' 3 blocks."""
        epoch, offset = divmod(int(position), self.order.total)
        _, _, blocks = self.order.epoch_layout(epoch)
        block = int(np.searchsorted(blocks, offset, side="right")) - 1
        if self._prefetched == (epoch, block):
            return
        self._prefetched = (epoch, block)
        current = set(self.order.block_shards_of(epoch, block).tolist())
        for shard in [s for s in self._open if s not in current]:
            self._drop(shard, self._open.pop(shard))
        nxt = self.order.block_shards_of(epoch + 1, 0) if block + 1 >= len(blocks) - 1 else \
            self.order.block_shards_of(epoch, block + 1)
        self._shard_cache().prefetch([(self.shard_names[k].decode(), int(self.shard_bytes[k]), self._sha(k))
                                      for k in nxt])

    def close(self) -> None:
        while self._open:
            self._drop(*self._open.popitem())
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def __getitem__(self, position: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        shard, index = self.order.locate(self.order.sample_id(position))
        if self.cache_spec is not None and isinstance(self.order, BlockShuffledOrder):
            self._enter_block(position)
        # A copy (the reader's array is a read-only view of the record) in the stored dtype.
        block = np.array(self._reader(shard).read(index), dtype=self.dtype)
        if self.vocab_size and (top := int(block.max())) >= self.vocab_size:
            self._refuse_ids(shard, index, block, top)
        tokens = torch.from_numpy(block.view(self.item_dtype))
        return (tokens, int(self.shard_source[shard])) if self.with_source else tokens

    def _refuse_ids(self, shard: int, index: int, block: np.ndarray, top: int) -> None:
        name = self.shard_names[shard].decode()
        where = int(np.argmax(block >= self.vocab_size))
        raise ValueError(f"{storage.join(self.data_dir, name)}: sample {index} holds token id {top} (at position "
                         f"{where}), but "
                         f"{self.manifest_path} says the tokenizer has {self.vocab_size} ids; the shard was not "
                         "written with this manifest's tokenizer: re-run prep for it (or restore the right shards)")

    def __getstate__(self) -> dict:
        # Open files do not cross process boundaries (spawned workers open their own).
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_pid"] = None
        state["_cache"] = None
        state["_prefetched"] = None
        return state


def check_shard_names(data_dir: str | Path, names: list[str], manifest_path: str | Path) -> None:
    """Refuse a shard name that would read a file outside ``data_dir``: an absolute path or a ``..``
    component (prep writes plain file names). The name alone is checked, with string tests (~0.5 µs
    per name, ~40 ms at 75k shards) and no filesystem call; a symlink the user placed in the data
    folder (shards linked in from a shared store) is the user's layout and is followed."""
    for name in names:
        parts = name.split("/")
        if not name or name.startswith(("/", "\\")) or ".." in parts or "\\" in name or name.endswith("/"):
            raise ValueError(f"{manifest_path}: shard name {name!r} points outside {data_dir}; a shard name must be "
                             "a file name inside the data folder (as slimpajama-prep writes them)")


def shard_sources(shards: list[dict[str, Any]]) -> tuple[list[str], np.ndarray]:
    """The sources that have a shard of their own (sorted), and per shard the index of its one
    source in that list, or -1 where a shard mixes sources."""
    single = [next(iter(s["tokens_per_source"])) if len(s.get("tokens_per_source", {})) == 1 else None
              for s in shards]
    names = sorted({x for x in single if x is not None})
    index = {x: k for k, x in enumerate(names)}
    return names, np.array([index[x] if x is not None else -1 for x in single], dtype=np.int16)


def check_manifest(manifest: dict[str, Any], data_dir: str | Path, seq_len: int | None, vocab_size: int | None,
                   tokenizer_sha256: str | None) -> None:
    """Refuse shards that do not match the model/tokenizer the trainer was configured with."""
    where = f"{data_dir}/manifest.json"
    if seq_len is not None and manifest["seq_len"] != seq_len:
        raise ValueError(f"{where}: shards have seq_len {manifest['seq_len']} but model.max_seq_len={seq_len}; "
                         "re-run prep or fix the override")
    tok = manifest["tokenizer"]
    if vocab_size is not None and vocab_size < tok["vocab_size"]:
        raise ValueError(f"{where}: tokenizer has {tok['vocab_size']} ids but model.vocab_size={vocab_size}")
    if tokenizer_sha256 is not None and tok["sha256"] != tokenizer_sha256:
        raise ValueError(f"{where}: tokenizer sha256 {tok['sha256'][:12]}… does not match "
                         f"data.tokenizer_sha256={tokenizer_sha256[:12]}…")


def open_dataset(cfg: DataConfig) -> tuple[dict[str, Any], str]:
    """(manifest, location) of ``data.path``: the location is a string (a local path or a URL)."""
    manifest = load_manifest(cfg.path)
    check_manifest(manifest, cfg.path, None, None, cfg.tokenizer_sha256)
    return manifest, cfg.path


def check_cache_fits(cfg: DataConfig, manifest: dict[str, Any], data_dir: str | Path) -> None:
    """Refuse at start-up a shard cache too small for the order: the ``global`` order reads any
    train shard at any step, so the cache must hold the whole train split (else nearly every read
    is a fetch: ``bench_loader`` measured ~4,000 bytes fetched per byte used at 75k shards); the
    ``blocks`` order needs three blocks of the largest shards (the block in use, the one prefetched,
    ranks of a global batch on both sides of a boundary). The val split's shards stay in use too."""
    spec = cfg.cache_spec()
    if spec is None:
        return
    sizes = {k: [s["bytes"] for s in v["shards"]] for k, v in manifest["splits"].items()}
    val = sum(sizes.get("val", []))
    train = sizes.get("train") or [0]
    need = (sum(train) if cfg.order == "global" else 3 * cfg.block_shards * max(train)) + val
    if need > spec.limit_bytes:
        what = ("the whole train split (the global order reads any shard at any step; data.order=blocks reads "
                "data.block_shards at a time)" if cfg.order == "global"
                else f"3 blocks of {cfg.block_shards} shards of up to {max(train)} bytes")
        raise ValueError(f"data.cache_limit_gb={cfg.cache_limit_gb}: the shard cache for {data_dir} must hold {what} "
                         f"plus the val split: {need / 2**30:.3g} GiB; raise data.cache_limit_gb or lower "
                         "data.block_shards")


def local_file(cfg: DataConfig, data_dir: str, name: str, sha256: str) -> Path:
    """A local path of file ``name`` of the data folder (the tokenizer): the file itself for a local
    folder; for a URL, a copy fetched into the cache folder (``.files/``, never evicted), checked
    against ``sha256``."""
    if not storage.is_remote(data_dir):
        return Path(storage.join(data_dir, name))
    spec = cfg.cache_spec()
    assert spec is not None
    cache = spec.build(data_dir)  # the folder checked (and marked) as a cache's before anything is put there
    cache.close()
    dest = cache.dir / ".files" / ShardCache.local_name(name, sha256)
    return storage.fetch_file(storage.join(data_dir, name), dest, sha256)
