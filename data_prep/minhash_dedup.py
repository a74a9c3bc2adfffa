"""Global fuzzy deduplication with MinHash LSH, in four task-parallel stages with bounded memory.

1. ``signatures`` (task i of n): shingle each document of clean part i (word n-grams of the
   normalized text by default), compute its MinHash signature (``rensa``, compiled), and spill one
   record per LSH band into bucket shard ``band_hash % n`` on disk; keep the signatures and (for the
   exact check) the sorted shingle hashes on disk, memory-mapped later.
2. ``buckets`` (task k of n): load bucket shard k from every part (1/n of all band records), sort,
   turn documents that share a band into candidate pairs, and verify each pair: the exact Jaccard of
   the shingle sets (default), the MinHash estimate, or nothing (SlimPajama's recipe).
3. ``clusters`` (task i of n): connected components over the verified edges only (O(duplicates),
   not O(corpus)); each component keeps its document that comes first in input order; task i
   writes the removals of parts i, i+n, ... and their ``removed.jsonl`` records.
4. ``filter``: later stages skip the removed documents of their part (:func:`load_removed`); the
   ``tokenize`` tasks apply it while reading their part.

Documents are identified by their input-order key (``file index << 32 | line``), so every choice
(which document a cluster keeps, which pairs are checked) is independent of the number of tasks.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_prep.document import Document

if TYPE_CHECKING:
    from data_prep.decontam import EvalNgrams

# SlimPajama's normalization for dedup: lowercase, ASCII punctuation removed, whitespace collapsed.
_PUNCT_TO_SPACE = bytes(32 if chr(i) in string.punctuation else i for i in range(256))
_POLY = np.uint64(0x100000001B3)  # FNV prime: odd, so the window hash below is a bijection per position
_BAND_MIX = np.uint64(0x9E3779B97F4A7C15)
# Random 64-bit values for each byte, so character n-gram hashes are not linear in the raw bytes.
_BYTE_TABLE = np.random.default_rng(0x5EED).integers(0, 2**63, 256, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


@dataclass
class DedupConfig:
    """Fuzzy dedup settings.

    Attributes:
        enabled: run fuzzy dedup (exact duplicates are near-duplicates too, so this also removes them).
        shingle: ``word`` (n-grams of words of the normalized text) or ``char`` (n-grams of its bytes).
        ngram: shingle length (SlimPajama: 13).
        num_perm: MinHash permutations.
        threshold: target Jaccard similarity.
        bands / rows: LSH layout; derived from ``threshold`` and ``num_perm`` when left null.
        verify: ``exact`` (Jaccard of the shingle sets, default), ``estimate`` (MinHash estimate) or
            ``none`` (every LSH candidate is a duplicate, as SlimPajama did).
        seed: MinHash seed.
        max_bucket_all_pairs: buckets up to this size check all pairs; larger ones a star plus a chain.
    """

    enabled: bool = True
    shingle: str = "word"
    ngram: int = 13
    num_perm: int = 128
    threshold: float = 0.8
    bands: int | None = None
    rows: int | None = None
    verify: str = "exact"
    seed: int = 42
    max_bucket_all_pairs: int = 32

    def __post_init__(self) -> None:
        if self.shingle not in ("word", "char"):
            raise ValueError(f"prep.dedup.shingle={self.shingle!r}: expected 'word' or 'char'")
        if self.verify not in ("exact", "estimate", "none"):
            raise ValueError(f"prep.dedup.verify={self.verify!r}: expected 'exact', 'estimate' or 'none'")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"prep.dedup.threshold={self.threshold}: must be in (0, 1]")
        if self.ngram < 1 or self.num_perm < 1:
            raise ValueError("prep.dedup.ngram and prep.dedup.num_perm must be >= 1")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("prep.dedup.bands and prep.dedup.rows: set both or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"prep.dedup.bands*rows={self.bands * self.rows} > prep.dedup.num_perm={self.num_perm}")

    def band_layout(self) -> tuple[int, int]:
        """(bands, rows): the configured ones, or those derived from the threshold."""
        if self.bands is not None:
            return self.bands, self.rows  # type: ignore[return-value]
        # With an exact check, a false positive costs one verification while a false negative is a
        # missed duplicate, so misses weigh 0.95; without a check both errors count equally (this
        # gives SlimPajama's b=9, r=13 for threshold 0.8 and 128 permutations).
        fn_weight = 0.95 if self.verify == "exact" else 0.5
        return optimal_bands(self.threshold, self.num_perm, 1.0 - fn_weight, fn_weight)


@functools.lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """Bands and rows minimizing the weighted false-positive and false-negative areas under the
    LSH S-curve ``1 - (1 - s^r)^b`` (the rule datasketch uses), all (b, r) pairs at once."""
    x = np.linspace(0.0, 1.0, 1001)
    lo, hi = x < threshold, x >= threshold
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)])
    b, r = pairs[:, :1].astype(float), pairs[:, 1:].astype(float)
    p = 1.0 - (1.0 - x[None, :] ** r) ** b  # (pairs, points)
    err = fp_weight * np.trapezoid(p[:, lo], x[lo], axis=1) + fn_weight * np.trapezoid(1.0 - p[:, hi], x[hi], axis=1)
    best = int(np.argmin(np.round(err, 12)))  # first minimum in (b, r) order, as the loop it replaces
    return int(pairs[best, 0]), int(pairs[best, 1])


def normalized_words(text: str) -> list[bytes]:
    """Words of SlimPajama's normalized text (lowercase, no ASCII punctuation) as UTF-8 bytes."""
    return text.lower().encode("utf-8").translate(_PUNCT_TO_SPACE).split()


def window_hashes(tokens: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every window of ``n`` consecutive tokens inside each document of a batch.

    ``tokens`` holds the documents' token hashes back to back, ``lengths`` their counts. A document
    shorter than ``n`` contributes one window over all its tokens. Returns (hashes, count per doc).
    Vectorized over the whole batch: ``n`` multiply-adds over one array instead of a loop per doc.
    """
    total = len(tokens)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    if total == 0:
        return np.zeros(0, np.uint64), np.zeros(len(lengths), np.int64)
    m = max(total - n + 1, 0)
    with np.errstate(over="ignore"):
        acc = tokens[:m].copy()
        for j in range(1, n):
            np.multiply(acc, _POLY, out=acc)
            np.add(acc, tokens[j : j + m], out=acc)
    full = np.maximum(lengths - n + 1, 0)
    idx = np.repeat(starts[:-1] - np.concatenate(([0], np.cumsum(full)[:-1])), full) + np.arange(full.sum())
    out = [acc[idx]]
    counts = full.astype(np.int64)
    short = np.nonzero((lengths > 0) & (lengths < n))[0]
    if len(short):  # one shingle over the whole (short) document
        extra = np.empty(len(short), np.uint64)
        with np.errstate(over="ignore"):
            for k, d in enumerate(short):
                h = np.uint64(0)
                for t in tokens[starts[d] : starts[d + 1]]:
                    h = h * _POLY + t
                extra[k] = h
        counts = counts.copy()
        counts[short] = 1
        # Re-interleave: per-document order is what the caller slices by.
        pieces, e, pos = [], 0, 0
        for d in range(len(lengths)):
            if lengths[d] >= n:
                pieces.append(out[0][pos : pos + full[d]])
                pos += full[d]
            elif lengths[d] > 0:
                pieces.append(extra[e : e + 1])
                e += 1
        out = [np.concatenate(pieces) if pieces else np.zeros(0, np.uint64)]
    return out[0], counts


_IS_SPACE = np.zeros(256, bool)
_IS_SPACE[list(b" \t\n\r\x0b\x0c")] = True


_POWER_CACHE: dict[int, np.ndarray] = {}


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """``base**t mod 2^64`` for t < n, cached (batches reuse them)."""
    cached = _POWER_CACHE.get(int(base))
    if cached is None or len(cached) < n:
        size = max(n, 1 << 12, 2 * len(cached) if cached is not None else 0)
        cached = np.empty(size, np.uint64)
        cached[0] = 1
        filled = 1
        with np.errstate(over="ignore"):  # wraps modulo 2^64, which is what we want
            while filled < size:  # doubling: base^(k+f) = base^k * base^f, one vector multiply per step
                step = min(filled, size - filled)
                cached[filled : filled + step] = cached[:step] * (cached[filled - 1] * base)
                filled += step
        _POWER_CACHE[int(base)] = cached
    return cached[:n]


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hash every word of the normalized texts without creating a Python object per word.

    Returns (word hashes back to back, words per document, 64-bit digest of each document's normalized
    word sequence). A word's hash is ``sum_t T[byte_t] * P^t mod 2^64`` over its bytes (t counted
    from the word's start), with a random table ``T``, computed for all words of the batch at once
    with one ``reduceat`` (this replaces ``bytes.split`` + per-word hashing, the former bottleneck).
    Powers are needed only up to the longest word, so no table grows with the batch.
    """
    norm = [t.lower().encode("utf-8").translate(_PUNCT_TO_SPACE) for t in texts]
    doc_len = np.fromiter((len(b) + 1 for b in norm), dtype=np.int64, count=len(norm))
    arr = np.frombuffer(b" ".join(norm) + b" ", dtype=np.uint8)
    word = ~_IS_SPACE[arr]
    edges = np.diff(word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    doc_start = np.zeros(len(norm) + 1, np.int64)
    np.cumsum(doc_len, out=doc_start[1:])
    counts = np.diff(np.searchsorted(starts, doc_start))
    if len(starts) == 0:
        return np.zeros(0, np.uint64), counts, np.zeros(len(norm), np.uint64)
    lengths = ends - starts
    first_byte = np.zeros(len(lengths), np.int64)  # where each word starts among the word bytes
    np.cumsum(lengths[:-1], out=first_byte[1:])
    offset = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(first_byte, lengths)
    with np.errstate(over="ignore"):
        vals = _BYTE_TABLE[arr[word]] * _powers(_POLY, int(lengths.max()))[offset]
        h = np.add.reduceat(vals, first_byte)
        h ^= h >> np.uint64(31)  # spread the high bits into the low ones rensa's permutations read
        # Order-sensitive digest of each document's word sequence (decontamination by hash).
        first = np.zeros(len(counts), np.int64)
        np.cumsum(counts[:-1], out=first[1:])
        pos = np.arange(len(h)) - np.repeat(first, counts)
        weighted = h * _powers(_POLY, int(counts.max()))[pos]
        digest = np.zeros(len(counts), np.uint64)
        nz = counts > 0
        digest[nz] = np.add.reduceat(weighted, first[nz])
    return h, counts, digest


def shingle_hashes(texts: list[str], cfg: DedupConfig,
                   words: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """64-bit shingle hashes of a batch: (flat hashes, offsets of each document, normalized digests).
    ``words`` is :func:`word_hashes` of ``texts`` when the caller has it already."""
    words, counts, digest = words if words is not None else word_hashes(texts)
    if cfg.shingle == "word":
        tokens, lengths = words, counts
    else:
        joined = [b" ".join(normalized_words(t)) for t in texts]
        lengths = np.fromiter((len(j) for j in joined), dtype=np.int64, count=len(texts))
        tokens = _BYTE_TABLE[np.frombuffer(b"".join(joined), dtype=np.uint8)]
    hashes, n_sh = window_hashes(tokens, lengths, cfg.ngram)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(n_sh, out=offsets[1:])
    return hashes, offsets, digest


def signatures(hashes: np.ndarray, offsets: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """MinHash signatures, shape (docs, num_perm), uint32 (rensa's compiled R-MinHash)."""
    import rensa

    n = len(offsets) - 1
    if n == 0:
        return np.zeros((0, cfg.num_perm), np.uint32)
    h = hashes
    off = offsets.astype(np.uint64)
    empty = np.nonzero(np.diff(offsets) == 0)[0]
    if len(empty):  # rensa needs at least one token per row; give empty docs one fixed token
        h = np.insert(hashes, offsets[empty], np.uint64(0))
        off = (offsets + np.concatenate(([0], np.cumsum(np.diff(offsets) == 0)))).astype(np.uint64)
    mat = rensa.RMinHash.digest_matrix_from_flat_token_hashes(h, off, cfg.num_perm, cfg.seed)
    return np.asarray(mat.to_rows(), dtype=np.uint32).reshape(n, cfg.num_perm)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per (document, band), shape (docs, bands); the band index is mixed in so equal
    keys mean the same band."""
    out = np.empty((len(sigs), bands), np.uint64)
    s = sigs.astype(np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            acc = np.full(len(sigs), np.uint64(b + 1) * _BAND_MIX, np.uint64)
            for r in range(rows):
                acc = (acc ^ s[:, b * rows + r]) * _POLY
            out[:, b] = acc ^ (acc >> np.uint64(29))
    return out


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """Sorted unique values (np.unique's hash-based path is several times slower on large arrays)."""
    x = np.sort(x)
    return x[np.concatenate(([True], x[1:] != x[:-1]))] if len(x) else x


def jaccard_sorted(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted arrays of unique values."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def candidate_pairs(keys: np.ndarray, docs: np.ndarray, all_pairs_up_to: int) -> np.ndarray:
    """Unique (a, b) document pairs, a < b, that share a band key.

    Small buckets give all their pairs; a large bucket (usually many copies of one text) gives a star
    from its first document plus a chain, which keeps the pair count linear in the bucket size.
    """
    if len(keys) < 2:
        return np.zeros((0, 2), np.uint64)
    order = np.lexsort((docs, keys))
    k, d = keys[order], docs[order]
    cut = np.nonzero(k[1:] != k[:-1])[0] + 1
    bounds = np.concatenate(([0], cut, [len(k)]))
    sizes = np.diff(bounds)
    pairs: list[np.ndarray] = []
    for g in np.nonzero(sizes >= 2)[0]:
        members = np.unique(d[bounds[g] : bounds[g + 1]])
        m = len(members)
        if m < 2:
            continue
        if m <= all_pairs_up_to:
            i, j = np.triu_indices(m, 1)
            pairs.append(np.stack([members[i], members[j]], 1))
        else:
            pairs.append(np.stack([np.repeat(members[0], m - 1), members[1:]], 1))
            pairs.append(np.stack([members[1:-1], members[2:]], 1))
    if not pairs:
        return np.zeros((0, 2), np.uint64)
    allp = np.concatenate(pairs).astype(np.uint64)
    return np.unique(allp, axis=0)


class UnionFind:
    """Union-find over dense integer ids, path halving; the smaller root wins so results are deterministic."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra


def clusters(edges_a: np.ndarray, edges_b: np.ndarray) -> dict[int, int]:
    """Map every document in a connected component (of order keys) to the component's keeper: the
    document with the smallest key (first in input order)."""
    nodes, inv = np.unique(np.concatenate([edges_a, edges_b]), return_inverse=True)
    uf = UnionFind(len(nodes))
    half = len(edges_a)
    for x, y in zip(inv[:half].tolist(), inv[half:].tolist()):
        uf.union(x, y)
    # Nodes are sorted, so the root (smallest dense id) is the smallest key.
    return {int(nodes[i]): int(nodes[uf.find(i)]) for i in range(len(nodes))}


# ----------------------------------------------------------------------------------------------
# On-disk layout of the dedup work directory, shared by the stages.
# ----------------------------------------------------------------------------------------------


@dataclass
class DedupPaths:
    root: Path

    def docs(self, part: int) -> Path:
        return self.root / "docs" / f"{part:05d}.npz"

    def sigs(self, part: int) -> Path:
        return self.root / "sigs" / f"{part:05d}.u32"  # raw (docs, num_perm) uint32, streamed

    def shingles(self, part: int) -> Path:
        return self.root / "shingles" / f"{part:05d}.u32"  # raw sorted shingle sets, back to back

    def shingle_offsets(self, part: int) -> Path:
        return self.root / "shingles" / f"{part:05d}.offsets.npy"  # written last, after the data

    def bands(self, bucket: int, part: int) -> Path:
        return self.root / "bands" / f"{bucket:05d}" / f"from-{part:05d}.bin"  # raw BAND_DTYPE records

    def edges(self, bucket: int) -> Path:
        return self.root / "edges" / f"{bucket:05d}.npy"

    def removed(self, part: int) -> Path:
        return self.root / "removed" / f"{part:05d}.npz"


EDGE_DTYPE = np.dtype([("a", "<u8"), ("b", "<u8"), ("estimate", "<f4"), ("exact", "<f4"), ("same_text", "?")])
BAND_DTYPE = np.dtype([("key", "<u8"), ("doc", "<u8")])


def save_npy(path: Path, arr: np.ndarray) -> None:
    """np.save under a temporary name, then rename (a crash never leaves a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
    Path(tmp).replace(path)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    Path(tmp).replace(path)


def content_digest(text: str) -> int:
    """64-bit content hash (exact duplicates share it)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def signature_task(
    docs: Iterable[tuple[int, Document]],
    part: int,
    num_buckets: int,
    cfg: DedupConfig,
    paths: DedupPaths,
    batch_bytes: int = 2 << 20,
    eval_ngrams: "EvalNgrams | None" = None,
) -> dict[str, Any]:
    """Signatures stage for one part: ``docs`` yields (order key, document) in key order.

    Writes the part's document table (keys, content hashes, sizes, sources, ids, decontamination
    flags), signatures, sorted shingle hashes (when verifying exactly) and band records spilled to
    ``num_buckets`` bucket shards. Memory: one batch of documents plus this part's signatures.
    """
    bands, rows = cfg.band_layout()
    keys: list[int] = []
    digests: list[int] = []
    norm_digests: list[int] = []
    nbytes: list[int] = []
    sources: list[str] = []
    ids: list[str] = []
    contaminated: list[bool] = []
    sh_counts: list[np.ndarray] = []
    # Signatures, shingle sets and band records are appended to files as each batch is done, so a
    # task's memory is one batch plus a few numbers per document, whatever the size of its part.
    # With dedup off only the document table is written (the split stage's hash decontamination
    # and the eval n-gram flags need it); no MinHash is computed.
    minhash = cfg.enabled
    exact = minhash and cfg.verify == "exact"
    if minhash:
        ensure_open_files(num_buckets + 64)
    out = _RawFiles()
    sig_fh = out.open(paths.sigs(part)) if minhash else None
    sh_fh = out.open(paths.shingles(part)) if exact else None
    band_fhs = [out.open(paths.bands(b, part)) for b in range(num_buckets)] if minhash else []
    batch: list[tuple[int, Document]] = []
    size = 0

    def flush() -> None:
        texts = [d.text for _, d in batch]
        words = word_hashes(texts)
        norm = words[2]
        if eval_ngrams is not None:
            contaminated.extend(eval_ngrams.contaminated(words[0], words[1]).tolist())
        if minhash:
            hashes, offsets, norm = shingle_hashes(texts, cfg, words)
            sig = signatures(hashes, offsets, cfg)
            assert sig_fh is not None
            sig_fh.write(np.ascontiguousarray(sig, np.uint32).tobytes())
            _spill_bands(band_keys(sig, bands, rows), np.array([k for k, _ in batch], np.uint64), band_fhs)
        if exact:
            doc_of = np.repeat(np.arange(len(batch), dtype=np.uint64), np.diff(offsets))
            # One sort for the whole batch: (doc, 32-bit shingle hash) pairs, unique. 32-bit hashes
            # halve the disk; with 2^32 values the Jaccard error is far below the threshold margin.
            u = _sorted_unique((doc_of << np.uint64(32)) | (hashes >> np.uint64(32)))
            bounds = np.searchsorted(u, np.arange(len(batch) + 1, dtype=np.uint64) << np.uint64(32))
            assert sh_fh is not None
            sh_fh.write((u & np.uint64(0xFFFFFFFF)).astype(np.uint32).tobytes())
            sh_counts.append(np.diff(bounds).astype(np.int64))
        norm_digests.extend(norm.tolist())
        for k, d in batch:
            keys.append(k)
            digests.append(content_digest(d.text))
            nbytes.append(d.nbytes)
            sources.append(d.source)
            ids.append(d.id)
        batch.clear()

    for key, doc in docs:
        batch.append((key, doc))
        size += doc.nbytes
        if size >= batch_bytes:
            flush()
            size = 0
    if batch:
        flush()
    out.commit()
    if exact:
        counts = np.concatenate(sh_counts) if sh_counts else np.zeros(0, np.int64)
        offs = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=offs[1:])
        save_npy(paths.shingle_offsets(part), offs)
    save_npz(
        paths.docs(part),
        key=np.array(keys, np.uint64),
        digest=np.array(digests, np.uint64),
        norm_digest=np.array(norm_digests, np.uint64),
        nbytes=np.array(nbytes, np.int64),
        source=np.array(sources, dtype=str),
        id=np.array(ids, dtype=str),
        contaminated=np.array(contaminated if eval_ngrams is not None else [False] * len(keys), bool),
        num_perm=np.array(cfg.num_perm),
    )
    return {"docs": len(keys), "bytes": int(sum(nbytes)), "bands": bands, "rows": rows}


def ensure_open_files(needed: int) -> None:
    """Raise this process's open-file limit to ``needed`` (a signatures task keeps one bucket file
    per task open); the soft limit is often 1024 while the hard limit allows far more."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise OSError(f"prep.num_tasks needs {needed} open files per signatures task but the hard limit "
                      f"(ulimit -Hn) is {hard}: use fewer tasks or raise the limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _spill_bands(keys: np.ndarray, doc_keys: np.ndarray, band_fhs: list) -> None:
    """Append the (band key, document) records of a batch to their bucket files (bucket = key mod n).

    One stable argsort by bucket and one write per non-empty bucket: O(records log records), where a
    mask per bucket would be O(records x buckets) for thousands of tasks.
    """
    bands = keys.shape[1]
    flat = keys.reshape(-1)
    target = flat % np.uint64(len(band_fhs))
    order = np.argsort(target, kind="stable")
    rec = np.empty(len(flat), BAND_DTYPE)
    rec["key"], rec["doc"] = flat[order], np.repeat(doc_keys, bands)[order]
    bounds = np.searchsorted(target[order], np.arange(len(band_fhs) + 1, dtype=np.uint64))
    for b in np.nonzero(np.diff(bounds))[0]:
        band_fhs[b].write(rec[bounds[b] : bounds[b + 1]].tobytes())


class _RawFiles:
    """Files written under temporary names and renamed together by :meth:`commit`."""

    def __init__(self) -> None:
        self._files: list[tuple[Any, Path, Path]] = []

    def open(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fh = open(tmp, "wb")
        self._files.append((fh, tmp, path))
        return fh

    def commit(self) -> None:
        for fh, tmp, path in self._files:
            fh.close()
            tmp.replace(path)


def _raw(path: Path, dtype: Any) -> np.ndarray:
    """Memory-map a raw file (an empty file gives an empty array; mmap cannot map 0 bytes)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class PartIndex:
    """Find a document's part and row from its order key (parts hold files ``i, i + n, ...``)."""

    def __init__(self, paths: DedupPaths, num_parts: int) -> None:
        self.paths = paths
        self.num_parts = num_parts
        self._keys: dict[int, np.ndarray] = {}
        self._sigs: dict[int, np.ndarray] = {}
        self._sh: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._docs: dict[int, Any] = {}

    @staticmethod
    def part_of(key: int, num_parts: int) -> int:
        return (key >> 32) % num_parts

    def _part_keys(self, part: int) -> np.ndarray:
        if part not in self._keys:
            self._keys[part] = np.load(self.paths.docs(part))["key"]
        return self._keys[part]

    def locate(self, key: int) -> tuple[int, int]:
        part = self.part_of(key, self.num_parts)
        return part, int(np.searchsorted(self._part_keys(part), np.uint64(key)))

    def locate_many(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part, row) of every key, one binary search per part."""
        parts = ((keys >> np.uint64(32)) % np.uint64(self.num_parts)).astype(np.int64)
        rows = np.empty(len(keys), np.int64)
        for p in np.unique(parts).tolist():
            sel = parts == p
            rows[sel] = np.searchsorted(self._part_keys(p), keys[sel])
        return parts, rows

    def _sig_table(self, part: int) -> np.ndarray:
        if part not in self._sigs:
            num_perm = int(self.docs(part)["num_perm"])
            self._sigs[part] = _raw(self.paths.sigs(part), np.uint32).reshape(-1, num_perm)
        return self._sigs[part]

    def gather(self, parts: np.ndarray, rows: np.ndarray, what: str) -> np.ndarray:
        """Signatures (``what="sig"``) or content digests (``"digest"``) at (part, row) pairs."""
        first = self._sig_table(int(parts[0])) if what == "sig" and len(parts) else None
        shape = (len(rows), first.shape[1]) if first is not None else (len(rows),)
        out = np.empty(shape, np.uint32 if what == "sig" else np.uint64)
        for p in np.unique(parts).tolist():
            sel = parts == p
            table = self._sig_table(p) if what == "sig" else self.docs(p)["digest"]
            out[sel] = table[rows[sel]]
        return out

    def shingles_at(self, part: int, row: int) -> np.ndarray:
        if part not in self._sh:
            self._sh[part] = (_raw(self.paths.shingles(part), np.uint32), np.load(self.paths.shingle_offsets(part)))
        data, offs = self._sh[part]
        return np.asarray(data[offs[row] : offs[row + 1]])

    def docs(self, part: int) -> Any:
        if part not in self._docs:
            self._docs[part] = dict(np.load(self.paths.docs(part)))
        return self._docs[part]

    def signature(self, key: int) -> np.ndarray:
        part, row = self.locate(key)
        return self._sig_table(part)[row]

    def digest(self, key: int) -> int:
        part, row = self.locate(key)
        return int(self.docs(part)["digest"][row])


def bucket_task(bucket: int, num_parts: int, cfg: DedupConfig, paths: DedupPaths) -> dict[str, Any]:
    """Buckets stage for bucket shard ``bucket``: candidate pairs from shared band keys, verified."""
    recs = [np.fromfile(paths.bands(bucket, p), dtype=BAND_DTYPE) for p in range(num_parts)]
    rec = np.concatenate(recs) if recs else np.zeros(0, BAND_DTYPE)
    pairs = candidate_pairs(rec["key"], rec["doc"], cfg.max_bucket_all_pairs)
    del rec, recs
    index = PartIndex(paths, num_parts)
    out = np.zeros(len(pairs), EDGE_DTYPE)
    out["a"], out["b"] = pairs[:, 0], pairs[:, 1]
    keep = np.zeros(len(pairs), bool)
    chunk = 1 << 16  # pairs per step: bounds the gathered signatures to ~64 MB
    for lo in range(0, len(pairs), chunk):
        sl = slice(lo, lo + chunk)
        pa, ra = index.locate_many(pairs[sl, 0])
        pb, rb = index.locate_many(pairs[sl, 1])
        est = (index.gather(pa, ra, "sig") == index.gather(pb, rb, "sig")).mean(axis=1)
        same = index.gather(pa, ra, "digest") == index.gather(pb, rb, "digest")
        exact = np.full(len(same), np.nan)
        if cfg.verify == "exact":
            exact[same] = 1.0
            for k in np.nonzero(~same)[0].tolist():
                exact[k] = jaccard_sorted(index.shingles_at(int(pa[k]), int(ra[k])), index.shingles_at(int(pb[k]), int(rb[k])))
            keep[sl] = exact >= cfg.threshold  # compared in float64, before the edge file's float32
        elif cfg.verify == "estimate":
            keep[sl] = est >= cfg.threshold
        else:
            keep[sl] = True
        out["estimate"][sl], out["exact"][sl], out["same_text"][sl] = est, exact, same
    save_npy(paths.edges(bucket), out[keep])
    return {"candidate_pairs": int(len(pairs)), "verified_pairs": int(keep.sum())}


def cluster_task(task: int, num_tasks: int, num_parts: int, num_buckets: int, paths: DedupPaths) -> dict[str, Any]:
    """Clusters stage, task ``task`` of ``num_tasks``.

    Every task builds the connected components of the verified edges (they join duplicates only, so
    they are small next to the corpus) and handles the removed documents of parts ``task, task+n, ...``:
    it writes those parts' rows to remove (and whether each is an exact copy of an earlier member of
    its cluster) and their ``removed.jsonl`` records (id, kept id, MinHash-estimated Jaccard with the
    kept document, and the exact one when it was computed); :func:`merge_removed` joins them.
    """
    edges = np.concatenate([np.load(paths.edges(b)) for b in range(num_buckets)]) if num_buckets else np.zeros(0, EDGE_DTYPE)
    keeper = clusters(edges["a"], edges["b"]) if len(edges) else {}
    exact_by_pair = {(int(e["a"]), int(e["b"])): float(e["exact"]) for e in edges}
    index = PartIndex(paths, num_parts)
    mine = set(range(task, num_parts, num_tasks))
    per_part: dict[int, list[tuple[int, bool]]] = {}
    lines: list[tuple[int, str]] = []
    seen_texts: set[tuple[int, int]] = set()  # (keeper, content digest) of earlier members
    for key in sorted(keeper):
        kept = keeper[key]
        digest = index.digest(key)
        # An exact duplicate repeats the text of an earlier document of its cluster (not
        # necessarily the keeper's): the report counts those as exact_dedup.
        same = (kept, digest) in seen_texts
        seen_texts.add((kept, digest))
        if kept == key or PartIndex.part_of(key, num_parts) not in mine:
            continue
        part, row = index.locate(key)
        kpart, krow = index.locate(kept)
        per_part.setdefault(part, []).append((row, same))
        est = float(np.mean(index.signature(key) == index.signature(kept)))
        rec = {
            "id": str(index.docs(part)["id"][row]),
            "kept_id": str(index.docs(kpart)["id"][krow]),
            "jaccard_estimate": round(est, 4),
            "exact_duplicate": bool(same),  # an earlier document of the cluster has the same text
            "source": str(index.docs(part)["source"][row]),
            "kept_source": str(index.docs(kpart)["source"][krow]),
        }
        ex = exact_by_pair.get((min(key, kept), max(key, kept)))
        if ex is not None and not math.isnan(ex):
            rec["jaccard_exact"] = round(ex, 4)
        lines.append((key, json.dumps(rec, ensure_ascii=False)))
    for part in sorted(mine):
        rows = per_part.get(part, [])
        save_npz(paths.removed(part), row=np.array([r for r, _ in rows], np.int64), exact=np.array([s for _, s in rows], bool))
    out = paths.root / "removed" / f"task-{task:05d}.json"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(lines))
    tmp.replace(out)
    return {"removed": len(lines), "clusters": len(set(keeper.values())), "edges": int(len(edges))}


def merge_removed(paths: DedupPaths, num_tasks: int, removed_jsonl: Path) -> int:
    """Join the clusters tasks' records into ``removed.jsonl``, in input order (same file for any n)."""
    lines: list[tuple[int, str]] = []
    for t in range(num_tasks):
        lines.extend((int(k), line) for k, line in json.loads((paths.root / "removed" / f"task-{t:05d}.json").read_text()))
    lines.sort()
    tmp = removed_jsonl.with_name(removed_jsonl.name + ".tmp")
    tmp.write_text("".join(line + "\n" for _, line in lines))
    tmp.replace(removed_jsonl)
    return len(lines)


def load_removed(paths: DedupPaths, part: int) -> dict[int, bool]:
    """Rows of ``part`` removed as duplicates -> whether each is an exact copy of its keeper."""
    path = paths.removed(part)
    if not path.is_file():
        return {}
    z = np.load(path)
    return dict(zip(z["row"].tolist(), z["exact"].tolist()))


def dedup_in_memory(texts: list[str], cfg: DedupConfig, work: Path, num_tasks: int = 1) -> set[int]:
    """Run the four stages on a list of texts (indices as keys); returns the removed indices.

    Used by tests and the benchmark; the pipeline runs the same functions as separate tasks.
    """
    paths = DedupPaths(work)
    for part in range(num_tasks):
        docs = ((i << 32, Document(id=str(i), text=t, source="s")) for i, t in enumerate(texts) if i % num_tasks == part)
        signature_task(docs, part, num_tasks, cfg, paths)
    for b in range(num_tasks):
        bucket_task(b, num_tasks, cfg, paths)
    for t in range(num_tasks):
        cluster_task(t, num_tasks, num_tasks, num_tasks, paths)
    merge_removed(paths, num_tasks, work / "removed.jsonl")
    removed: set[int] = set()
    for part in range(num_tasks):
        keys = np.load(paths.docs(part))["key"]
        removed.update(int(keys[r]) >> 32 for r in load_removed(paths, part))
    return removed


def iter_with_keys(docs: Iterable[Document], file_index: dict[str, int]) -> Iterator[tuple[int, Document]]:
    """Attach the input-order key (``file index << 32 | line``) to documents whose id is ``file:line``."""
    for d in docs:
        rel, _, line = d.id.rpartition(":")
        yield (file_index[rel] << 32) | int(line), d
