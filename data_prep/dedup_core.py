"""Fuzzy deduplication, the pure part: shingles, MinHash signatures, LSH bands, candidate pairs,
their verification and the connected components of the verified pairs.

Everything here works on in-memory arrays, so it can be tested without a work directory;
:func:`dedup_texts` runs it end to end on a list of texts. :mod:`data_prep.dedup_tasks` runs the
same functions as task-parallel stages over a corpus on disk. Documents are identified by integer
keys that follow input order, and each component keeps its smallest key, so which document
survives never depends on the number of tasks.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data_prep.text_hash import BYTE_TABLE, POLY, PUNCTUATION_MODES, normalized_words, window_hashes, word_hashes

BAND_DTYPE = np.dtype([("key", "<u8"), ("doc", "<u8")])
_BAND_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class DedupConfig:
    """Fuzzy dedup settings.

    Attributes:
        enabled: run fuzzy dedup (exact duplicates are near-duplicates too, so this also removes them).
        shingle: ``word`` (n-grams of words of the normalized text) or ``char`` (n-grams of its bytes).
        punctuation: what the normalization does with punctuation (ASCII and Unicode category P*):
            ``delete`` it, as SlimPajama's ``to_hash.py`` (``don't`` is the word ``dont``), or
            replace it by a ``space`` (``don t``). Decontamination n-grams and the holdout's
            normalized digests use the same setting (:mod:`data_prep.text_hash`).
        ngram: shingle length (SlimPajama: 13).
        num_perm: MinHash permutations.
        threshold: target Jaccard similarity.
        lsh_threshold: with ``verify=exact``, the Jaccard the derived band layout targets: below
            ``threshold``, so pairs right at the threshold are still found (the exact check keeps
            precision). 0.7 gives 21 x 6 at 128 permutations: P(found | J=0.80) = 0.998, where
            targeting 0.8 itself (16 x 8) finds only 0.947 (benchmarks/bench_lsh_layout.py).
            Null: target ``threshold``.
        bands / rows: LSH layout; derived from ``lsh_threshold`` (or ``threshold``) and
            ``num_perm`` when left null.
        verify: ``exact`` (Jaccard of the shingle sets, default), ``estimate`` (MinHash estimate) or
            ``none`` (every LSH candidate is a duplicate, as SlimPajama did).
        seed: MinHash seed.
        max_bucket_all_pairs: buckets up to this size check all pairs; larger ones a star plus a chain.
    """

    enabled: bool = True
    shingle: str = "word"
    punctuation: str = "delete"
    ngram: int = 13
    num_perm: int = 128
    threshold: float = 0.8
    lsh_threshold: float | None = 0.7
    bands: int | None = None
    rows: int | None = None
    verify: str = "exact"
    seed: int = 42
    max_bucket_all_pairs: int = 32

    def __post_init__(self) -> None:
        if self.shingle not in ("word", "char"):
            raise ValueError(f"prep.dedup.shingle={self.shingle!r}: expected 'word' or 'char'")
        if self.punctuation not in PUNCTUATION_MODES:
            raise ValueError(f"prep.dedup.punctuation={self.punctuation!r}: expected 'delete' (SlimPajama) or 'space'")
        if self.verify not in ("exact", "estimate", "none"):
            raise ValueError(f"prep.dedup.verify={self.verify!r}: expected 'exact', 'estimate' or 'none'")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"prep.dedup.threshold={self.threshold}: must be in (0, 1]")
        if self.ngram < 1 or self.num_perm < 1:
            raise ValueError("prep.dedup.ngram and prep.dedup.num_perm must be >= 1")
        if self.lsh_threshold is not None and not 0.0 < self.lsh_threshold <= self.threshold:
            raise ValueError(f"prep.dedup.lsh_threshold={self.lsh_threshold}: must be in "
                             f"(0, threshold={self.threshold}]")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("prep.dedup.bands and prep.dedup.rows: set both or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"prep.dedup.bands*rows={self.bands * self.rows} > prep.dedup.num_perm={self.num_perm}")

    def band_layout(self) -> tuple[int, int]:
        """(bands, rows): the configured ones, or those derived from the threshold."""
        if self.bands is not None:
            return self.bands, self.rows  # type: ignore[return-value]
        # With an exact check, a false positive costs one verification while a false negative is a
        # missed duplicate, so misses weigh 0.95 and the layout targets the lower lsh_threshold.
        # Without a check both errors count equally at the threshold itself (SlimPajama's b=9, r=13
        # for 0.8 and 128 permutations): a lower target would remove documents below it.
        if self.verify == "exact":
            target = self.lsh_threshold if self.lsh_threshold is not None else self.threshold
            return optimal_bands(target, self.num_perm, 0.05, 0.95)
        return optimal_bands(self.threshold, self.num_perm, 0.5, 0.5)


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


def shingle_hashes(texts: list[str], cfg: DedupConfig, words: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """64-bit shingle hashes of a batch: (flat hashes, offsets of each document, normalized digests).
    ``words`` is :func:`word_hashes` of ``texts`` when the caller has it already."""
    words, counts, digest = words if words is not None else word_hashes(texts, cfg.punctuation)
    if cfg.shingle == "word":
        tokens, lengths = words, counts
    else:
        joined = [b" ".join(normalized_words(t, cfg.punctuation)) for t in texts]
        lengths = np.fromiter((len(j) for j in joined), dtype=np.int64, count=len(texts))
        tokens = BYTE_TABLE[np.frombuffer(b"".join(joined), dtype=np.uint8)]
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
                acc = (acc ^ s[:, b * rows + r]) * POLY
            out[:, b] = acc ^ (acc >> np.uint64(29))
    return out


def sorted_unique(x: np.ndarray) -> np.ndarray:
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
    """Unique (a, b) document pairs, a < b, that share a band key (see :func:`candidate_pair_index`)."""
    idx = candidate_pair_index(keys, docs, all_pairs_up_to)
    return docs[idx].astype(np.uint64).reshape(-1, 2)


def candidate_pair_index(keys: np.ndarray, docs: np.ndarray, all_pairs_up_to: int) -> np.ndarray:
    """Record indices ``(i, j)`` of the unique document pairs ``docs[i] < docs[j]`` that share a band
    key, sorted by document pair. Indices rather than documents, so a caller can read any other
    field of the two records (the buckets stage reads their rows) without a lookup table.

    Small buckets give all their pairs; a large bucket (usually many copies of one text) gives a star
    from its first document plus a chain, which keeps the pair count linear in the bucket size.
    Memory: three 8-byte arrays per record (the sort order and the sorted keys and documents).
    """
    if len(keys) < 2:
        return np.zeros((0, 2), np.int64)
    order = np.lexsort((docs, keys))
    k, d = keys[order], docs[order]
    new_key = np.concatenate(([True], k[1:] != k[:-1]))
    first = new_key | np.concatenate(([True], d[1:] != d[:-1]))  # one record per (key, document)
    del k, d
    sel = order[first]  # sorted by key, then document
    group = (np.cumsum(new_key) - 1)[first]
    del order, new_key, first
    starts = np.flatnonzero(np.concatenate(([True], group[1:] != group[:-1])))
    sizes = np.diff(np.append(starts, len(sel)))
    del group
    kept = np.zeros((0, 2), np.int64)  # unique pairs so far
    pending: list[np.ndarray] = []
    n_pending = 0

    def add(pairs: np.ndarray) -> None:
        # A pair of near duplicates shares many bands, so it comes back once per shared band: fold
        # the pending pairs into the unique ones whenever they outnumber them, which keeps memory
        # proportional to the unique pairs rather than to pairs x bands.
        nonlocal kept, pending, n_pending
        pending.append(pairs)
        n_pending += len(pairs)
        if n_pending > max(1 << 18, len(kept)):
            kept = _unique_pairs(np.concatenate([kept, *pending]), docs)
            pending, n_pending = [], 0

    # Buckets of equal size at once: all pairs of every size-m bucket come from one index matrix.
    for m in np.unique(sizes[sizes >= 2]).tolist():
        group_starts = starts[sizes == m]
        if m <= all_pairs_up_to:
            i, j = np.triu_indices(m, 1)
            step = max(1, (1 << 18) // len(i))
            for lo in range(0, len(group_starts), step):
                members = sel[group_starts[lo : lo + step, None] + np.arange(m)]  # (buckets, m)
                add(np.stack([members[:, i].ravel(), members[:, j].ravel()], 1))
        else:
            for s0 in group_starts.tolist():
                members = sel[s0 : s0 + m]
                add(np.stack([np.repeat(members[0], m - 1), members[1:]], 1))
                add(np.stack([members[1:-1], members[2:]], 1))
    return _unique_pairs(np.concatenate([kept, *pending]).astype(np.int64), docs)


def _unique_pairs(idx: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """The first of the record pairs with the same two documents, sorted by document pair."""
    if not len(idx):
        return idx
    _, first = np.unique(np.stack([docs[idx[:, 0]], docs[idx[:, 1]]], 1), axis=0, return_index=True)
    return idx[first]


def verify_pairs(cfg: DedupConfig, estimate: np.ndarray, same_text: np.ndarray,
                 exact_jaccard: Callable[[int], float]) -> tuple[np.ndarray, np.ndarray]:
    """Which candidate pairs are duplicates, and their exact Jaccard (NaN where not computed).

    ``estimate``: the MinHash estimate of each pair; ``same_text``: equal content digests (Jaccard
    1 without looking at shingles); ``exact_jaccard(k)``: the exact Jaccard of pair ``k``, called
    only for ``verify="exact"`` and pairs whose texts differ.
    """
    exact = np.full(len(estimate), np.nan)
    if cfg.verify == "exact":
        exact[same_text] = 1.0
        for k in np.nonzero(~same_text)[0].tolist():
            exact[k] = exact_jaccard(k)
        return exact >= cfg.threshold, exact  # compared in float64
    if cfg.verify == "estimate":
        return estimate >= cfg.threshold, exact
    return np.ones(len(estimate), bool), exact


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the graph with edges ``a[i] - b[i]`` (document keys).

    Returns ``(nodes, keeper)``: the sorted keys that occur in an edge and, for each, the smallest
    key of its component (the document kept: first in input order). scipy's compiled traversal
    replaces a per-edge Python union-find (minutes and ~100 bytes per edge at corpus scale);
    node ids are int32 while the graph has fewer than 2^31 nodes, which halves the index arrays.
    """
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components

    if len(a) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    nodes = sorted_unique(np.concatenate([a, b]))
    idx = np.int32 if len(nodes) < 2**31 else np.int64
    ia = np.searchsorted(nodes, a).astype(idx)
    ib = np.searchsorted(nodes, b).astype(idx)
    graph = coo_array((np.ones(len(ia), np.int8), (ia, ib)), shape=(len(nodes), len(nodes)))
    del ia, ib
    _, labels = connected_components(graph, directed=False)
    # nodes are sorted, so the first node of each label is the component's smallest key
    _, first = np.unique(labels, return_index=True)
    return nodes, nodes[first[labels]]


def exact_copies(nodes: np.ndarray, keeper: np.ndarray, digest: np.ndarray) -> np.ndarray:
    """Per node: does an earlier document (smaller key) of its component have the same text?

    Those are the exact duplicates the report counts apart from near duplicates (the copy need not
    be of the keeper: ``A, B, B'`` with ``B' == B`` makes ``B'`` exact).
    """
    order = np.lexsort((nodes, digest, keeper))
    k, d = keeper[order], digest[order]
    first = np.ones(len(order), bool)
    first[1:] = (k[1:] != k[:-1]) | (d[1:] != d[:-1])
    out = np.empty(len(order), bool)
    out[order] = ~first
    return out


def text_batches(texts: list[str], batch_bytes: int = 2 << 20) -> list[tuple[int, int]]:
    """[lo, hi) ranges of consecutive texts of about ``batch_bytes`` characters each (the stages'
    batch size: one huge batch spends its time in page faults)."""
    out, lo, size = [], 0, 0
    for i, t in enumerate(texts):
        size += len(t)
        if size >= batch_bytes:
            out.append((lo, i + 1))
            lo, size = i + 1, 0
    if lo < len(texts):
        out.append((lo, len(texts)))
    return out


def dedup_texts(texts: list[str], cfg: DedupConfig, counts: dict[str, int] | None = None,
                batch_bytes: int = 2 << 20) -> set[int]:
    """Indices of the texts fuzzy dedup removes, computed in memory (tests, benchmarks).

    The same functions and decisions as the on-disk stages, with the text index as the key:
    shingles and signatures in batches of ``batch_bytes`` (one huge batch spends its time in page
    faults), exact checks on the 32-bit shingle sets the stages store. ``counts`` receives the
    candidate and verified pair counts.
    """
    from data_prep.text_hash import content_digest

    if not cfg.enabled or not texts:
        return set()
    bands, rows = cfg.band_layout()
    sigs, sets = [], []
    for lo, hi in text_batches(texts, batch_bytes):
        hashes, offsets, _ = shingle_hashes(texts[lo:hi], cfg)
        sigs.append(signatures(hashes, offsets, cfg))
        if cfg.verify == "exact":
            sets += [sorted_unique(hashes[offsets[k] : offsets[k + 1]] >> np.uint64(32)) for k in range(hi - lo)]
    sig = np.concatenate(sigs)
    keys = band_keys(sig, bands, rows)
    docs = np.repeat(np.arange(len(texts), dtype=np.uint64), bands)
    pairs = candidate_pairs(keys.reshape(-1), docs, cfg.max_bucket_all_pairs)
    a, b = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    digests = np.array([content_digest(t) for t in texts], np.uint64)
    keep, _ = verify_pairs(cfg, (sig[a] == sig[b]).mean(axis=1), digests[a] == digests[b],
                           lambda k: jaccard_sorted(sets[a[k]], sets[b[k]]))
    nodes, keeper = components(pairs[keep, 0], pairs[keep, 1])
    if counts is not None:
        counts.update(candidate_pairs=len(pairs), verified_pairs=int(keep.sum()), bands=bands, rows=rows)
    return set(nodes[nodes != keeper].astype(np.int64).tolist())
