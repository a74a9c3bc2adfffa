"""The token stream of a split, planned once and cut into shards by many tasks.

The train stream holds the split's documents in input order, each followed by EOS, pass after pass
for mixture repeats (pass ``k`` holds the documents with more than ``k`` copies), cut into shards of
``samples_per_shard`` blocks. The validation stream is grouped by source (input order within each),
and every source is cut into its own shards (its last partial block dropped): each validation
sample then comes from one source, which is what per-domain validation loss needs.

The plan stage writes a stream as ``.npy`` columns (part, offset and count of each document's
tokens, its source, the stream offset ``cum`` of every document, and each shard's first token and
block count); a shards task memory-maps them and reads only the rows of its own shards, so its
memory does not grow with the corpus.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from data_prep.atomic import save_npy, write_json
from data_prep.doc_table import column
from data_prep.layout import WorkDir
from data_prep.mixture import MixtureConfig, check_sources, copies, source_factors

_ARRAYS = {"part": np.int32, "offset": np.int64, "count": np.int32, "source": np.int32, "cum": np.int64,
           "shard_start": np.int64, "shard_blocks": np.int32}


@dataclass
class SplitPlan:
    """Documents of a split's stream (``part``/``offset``/``count`` of their tokens, ``source``
    index into ``sources``), ``cum``, the stream offset of each (one more entry: the total), and
    per shard the stream offset of its first token and its number of blocks."""

    part: np.ndarray
    offset: np.ndarray
    count: np.ndarray
    source: np.ndarray
    cum: np.ndarray
    shard_start: np.ndarray
    shard_blocks: np.ndarray
    sources: list[str]
    blocks: int  # blocks written
    shards: int
    factors: dict[str, float]
    tokens_available: dict[str, int]

    def save(self, work: WorkDir, split: str) -> dict[str, object]:
        for name, dtype in _ARRAYS.items():
            save_npy(work.plan_dir(split) / f"{name}.npy", getattr(self, name).astype(dtype))
        summary = {"sources": self.sources, "blocks": self.blocks, "shards": self.shards, "factors": self.factors,
                   "tokens_available": self.tokens_available}
        write_json(work.plan_summary(split), summary)  # last: the arrays are complete
        return summary

    @classmethod
    def load(cls, work: WorkDir, split: str) -> SplitPlan:
        """The plan the ``plan`` stage wrote, its arrays memory-mapped."""
        meta = json.loads(work.plan_summary(split).read_text())
        arrays = {name: np.load(work.plan_dir(split) / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        return cls(**arrays, **meta)


def plan_split(work: WorkDir, num_parts: int, split_code: int, mixture: MixtureConfig, block_size: int,
               samples_per_shard: int, shard_divisor: int) -> SplitPlan:
    """Deterministic stream of a split: documents in input order, pass after pass for repeats.

    Holds ~60 bytes per document of the split (keys for the order, token locations, sources and
    mixture draws); the token ids themselves stay on disk.
    """
    keys, parts, offs, cnts, srcs, draws = [], [], [], [], [], []
    names: set[str] = set()
    part_sources: list[list[str]] = []
    for p in range(num_parts):
        part_sources.append(json.loads((work.docs(p) / "sources.json").read_text()))
        names.update(part_sources[-1])
    sources = sorted(names)
    check_sources(mixture, sources)
    for p in range(num_parts):
        codes = np.load(work.split_codes(p))
        with np.load(work.tokens(p)[1]) as z:
            row, count, draw = z["row"], z["count"], z["draw"]
        offset = np.zeros(len(count), np.int64)
        np.cumsum(count[:-1], out=offset[1:])
        sel = codes[row] == split_code
        to_global = np.searchsorted(sources, part_sources[p]).astype(np.int32)
        keys.append(column(work.docs(p), "key", mmap=True)[row[sel]])
        parts.append(np.full(int(sel.sum()), p, np.int32))
        offs.append(offset[sel])
        cnts.append(count[sel].astype(np.int32))
        srcs.append(to_global[column(work.docs(p), "source", mmap=True)[row[sel]]] if len(to_global)
                    else np.zeros(int(sel.sum()), np.int32))
        draws.append(draw[sel])
    key = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    order = np.argsort(key, kind="stable")
    del key, keys
    part, offset, count, src, draw = (np.concatenate(x)[order] for x in (parts, offs, cnts, srcs, draws))
    del order
    present = np.bincount(src, minlength=len(sources)) > 0
    sources = [s for k, s in enumerate(sources) if present[k]]
    src = (np.cumsum(present) - 1)[src].astype(np.int32) if len(src) else src
    tok = np.bincount(src, weights=count + 1, minlength=len(sources))
    available = {s: int(tok[k]) for k, s in enumerate(sources)}
    if split_code == 0 and available:
        factors = source_factors(mixture, available)
    else:
        factors = {s: 1.0 for s in sources}
    n_copies = np.zeros(len(count), np.int64)
    for k, s in enumerate(sources):
        sel = np.nonzero(src == k)[0]
        n_copies[sel] = copies(draw[sel], factors[s], count[sel] + 1)
    passes = [np.nonzero(n_copies > p)[0] for p in range(int(n_copies.max()) if len(n_copies) else 0)]
    idx = np.concatenate(passes) if passes else np.zeros(0, np.int64)
    part, offset, count, src = part[idx], offset[idx], count[idx], src[idx]
    if split_code != 0:  # validation: grouped by source, each source cut into its own shards
        by_source = np.argsort(src, kind="stable")
        part, offset, count, src = part[by_source], offset[by_source], count[by_source], src[by_source]
    cum = np.zeros(len(count) + 1, np.int64)
    np.cumsum(count.astype(np.int64) + 1, out=cum[1:])
    B, sps = block_size, samples_per_shard
    if split_code == 0:
        total_blocks = int(cum[-1]) // B
        if shard_divisor > 1:
            full = total_blocks // sps
            shards = full - full % shard_divisor
            if shards == 0:
                raise ValueError(f"{total_blocks} train blocks make {full} full shards of samples_per_shard={sps}, "
                                 f"fewer than shard_divisor={shard_divisor}: lower samples_per_shard")
            blocks = shards * sps
        else:
            blocks = total_blocks
        first = np.arange(0, blocks, sps, dtype=np.int64)
        starts, sizes = first * B, np.minimum(sps, blocks - first)
    else:
        seg = np.searchsorted(src, np.arange(len(sources) + 1))  # each source's documents
        starts_l, sizes_l = [], []
        for k in range(len(sources)):
            lo, n_blocks = int(cum[seg[k]]), int(cum[seg[k + 1]] - cum[seg[k]]) // B
            first = np.arange(0, n_blocks, sps, dtype=np.int64)
            starts_l.append(lo + first * B)
            sizes_l.append(np.minimum(sps, n_blocks - first))
        starts = np.concatenate(starts_l) if starts_l else np.zeros(0, np.int64)
        sizes = np.concatenate(sizes_l) if sizes_l else np.zeros(0, np.int64)
        blocks = int(sizes.sum())
    return SplitPlan(part, offset, count, src, cum, starts, sizes, sources, blocks, len(starts), factors, available)


def stream_tokens(work: WorkDir, plan: SplitPlan, start: int, stop: int, dtype: np.dtype,
                  eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [start, stop) of the stream and the source index of each."""
    first = int(np.searchsorted(plan.cum, start, side="right")) - 1
    toks, srcs = [], []
    maps: dict[int, np.ndarray] = {}
    pos = int(plan.cum[first])
    d = first
    while pos < stop:
        p = int(plan.part[d])
        if p not in maps:
            path = work.tokens(p)[0]
            maps[p] = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
        off, n = int(plan.offset[d]), int(plan.count[d])
        t = np.empty(n + 1, dtype)
        t[:-1] = maps[p][off : off + n]
        t[-1] = eos
        toks.append(t)
        srcs.append(np.full(len(t), plan.source[d], np.int32))
        pos += len(t)
        d += 1
    tok = np.concatenate(toks)
    src = np.concatenate(srcs)
    lo = start - int(plan.cum[first])
    return tok[lo : lo + stop - start], src[lo : lo + stop - start]
