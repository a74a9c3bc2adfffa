"""Fuzzy dedup of a corpus on disk: the :mod:`data_prep.dedup_core` functions as stages whose
memory is bounded per task.

1. ``signatures`` (task p of n, :func:`write_signatures`): shingle each document of clean part p,
   compute its MinHash signature and spill one record per LSH band into bucket file
   ``band_key % n``; write the part's document table, its signatures and (for the exact check) its
   sorted shingle sets. Memory: one batch of documents.
2. ``buckets`` (task b of n, :func:`verify_bucket`): read bucket b from every part (in several
   passes when it would not fit the memory budget), turn documents that share a band key into
   candidate pairs, verify them, and reduce the verified pairs to a spanning forest (one edge per
   duplicate document) before writing them.
3. ``components`` (one task, :func:`find_components`): connected components of all forest edges
   with scipy; each component keeps its smallest key. Writes the removed rows of each part.
   Memory: ~100 bytes per document that has a duplicate; nothing per unique document.
4. ``removals`` (task p of n, :func:`record_removals`): the ``removed.jsonl`` records of part p
   (ids, kept ids, Jaccard estimate and exact value), merged in input order by
   :func:`merge_removed_records`.

Signatures, shingles and table columns of other parts are read row by row (``pread``) for one
chunk of pairs at a time, so what a task holds of them is bounded by the chunk, not by the corpus.
"""
from __future__ import annotations

import ctypes
import heapq
import json
import math
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from data_prep.atomic import FileGroup, atomic_path, save_npy, save_npz
from data_prep.dedup_core import (
    DedupConfig,
    band_keys,
    candidate_pair_index,
    components,
    exact_copies,
    jaccard_sorted,
    shingle_hashes,
    signatures,
    sorted_unique,
    verify_pairs,
)
from data_prep.doc_table import DocTableBuilder, column, doc_id, part_of
from data_prep.document import Document
from data_prep.layout import WorkDir
from data_prep.text_hash import content_digest, hash_fraction, word_hashes

if TYPE_CHECKING:
    from data_prep.decontam import EvalNgrams

# One record per (document, band): the band key, the document's key and its row in its part.
BAND_RECORD = np.dtype([("key", "<u8"), ("doc", "<u8"), ("row", "<u4")])
# Pairs verified at once: their two signature rows (512 B each) are read for the chunk, ~8 MiB.
_PAIR_CHUNK = 1 << 13
# A band record (20 B) plus the sort order and sorted keys and documents built from it (24 B), and
# the temporaries of the lexsort: measured 80-85 B per record at the peak (bench_prep_scale.py).
_BYTES_PER_RECORD_IN_MEMORY = 100


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``). After a large array is freed,
    glibc raises its mmap threshold and serves the next large arrays from the heap, whose freed
    pages it keeps: without this a task's RSS ratchets up pass after pass. A no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def ensure_open_files(needed: int) -> None:
    """Raise this process's open-file limit to ``needed`` (a signatures task keeps one bucket file
    per task open); the soft limit is often 1024 while the hard limit allows far more."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise OSError(f"prep.run.num_tasks needs {needed} open files per task but the hard limit "
                      f"(ulimit -Hn) is {hard}: use fewer tasks or raise the limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# ---------------------------------------------------------------------------------------------- signatures


def write_signatures(
    docs: Iterable[tuple[int, Document]],
    part: int,
    num_buckets: int,
    cfg: DedupConfig,
    work: WorkDir,
    batch_bytes: int = 2 << 20,
    eval_ngrams: EvalNgrams | None = None,
) -> dict[str, Any]:
    """Signatures stage for one part: ``docs`` yields (order key, document) in key order.

    Writes the part's document table, and with dedup on its signatures, sorted shingle sets (exact
    check only) and band records spilled to ``num_buckets`` bucket files. Everything but the table's
    few numbers per document is appended to files batch by batch.
    """
    bands, rows = cfg.band_layout()
    table = DocTableBuilder()
    sh_counts: list[np.ndarray] = []
    minhash = cfg.enabled
    exact = minhash and cfg.verify == "exact"
    if minhash:
        ensure_open_files(num_buckets + 64)
    out = FileGroup()
    sig_fh = out.open(work.sigs(part)) if minhash else None
    sh_fh = out.open(work.shingles(part)) if exact else None
    band_fhs = [out.open(work.bands(b, part)) for b in range(num_buckets)] if minhash else []
    done = 0  # rows written so far
    batch: list[tuple[int, Document]] = []

    def flush() -> None:
        nonlocal done
        if done + len(batch) > 2**32:
            raise ValueError(f"part {part} has over 2^32 documents (band records store 32-bit rows): use more tasks")
        texts = [d.text for _, d in batch]
        keys = np.fromiter((k for k, _ in batch), np.uint64, len(batch))
        words = word_hashes(texts, cfg.punctuation)
        norm = words[2]
        contaminated = eval_ngrams.contaminated(words[0], words[1]) if eval_ngrams is not None else None
        if minhash:
            hashes, offsets, norm = shingle_hashes(texts, cfg, words)
            sig = signatures(hashes, offsets, cfg)
            assert sig_fh is not None
            sig_fh.write(np.ascontiguousarray(sig, np.uint32).tobytes())
            row_ids = np.arange(done, done + len(batch), dtype=np.uint32)
            _spill_bands(band_keys(sig, bands, rows), keys, row_ids, band_fhs)
        if exact:
            doc_of = np.repeat(np.arange(len(batch), dtype=np.uint64), np.diff(offsets))
            # One sort for the whole batch: (doc, 32-bit shingle hash) pairs, unique. 32-bit hashes
            # halve the disk; with 2^32 values the Jaccard error is far below the threshold margin.
            u = sorted_unique((doc_of << np.uint64(32)) | (hashes >> np.uint64(32)))
            bounds = np.searchsorted(u, np.arange(len(batch) + 1, dtype=np.uint64) << np.uint64(32))
            assert sh_fh is not None
            sh_fh.write((u & np.uint64(0xFFFFFFFF)).astype(np.uint32).tobytes())
            sh_counts.append(np.diff(bounds).astype(np.int64))
        table.add(keys, [content_digest(t) for t in texts], norm, [d.nbytes for _, d in batch],
                  [d.source for _, d in batch], [hash_fraction(d.id) for _, d in batch], contaminated)
        done += len(batch)
        batch.clear()

    size = 0
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
        save_npy(work.shingle_offsets(part), offs)
    finished = table.finish()
    finished.save(work.docs(part))
    return {"docs": len(finished), "bytes": int(finished.nbytes.sum()), "bands": bands, "rows": rows,
            "num_perm": cfg.num_perm}


def _spill_bands(keys: np.ndarray, doc_keys: np.ndarray, rows: np.ndarray, band_fhs: list) -> None:
    """Append the band records of a batch to their bucket files (bucket = band key mod n).

    One stable argsort by bucket and one write per non-empty bucket: O(records log records), where a
    mask per bucket would be O(records x buckets) for thousands of tasks.
    """
    bands = keys.shape[1]
    flat = keys.reshape(-1)
    target = flat % np.uint64(len(band_fhs))
    order = np.argsort(target, kind="stable")
    rec = np.empty(len(flat), BAND_RECORD)
    rec["key"], rec["doc"], rec["row"] = flat[order], np.repeat(doc_keys, bands)[order], np.repeat(rows, bands)[order]
    bounds = np.searchsorted(target[order], np.arange(len(band_fhs) + 1, dtype=np.uint64))
    for b in np.nonzero(np.diff(bounds))[0]:
        band_fhs[b].write(rec[bounds[b] : bounds[b + 1]].tobytes())


# ---------------------------------------------------------------------------------------------- buckets


class _Rows:
    """Reads single rows of signatures, shingle sets and table columns of any part with ``pread``.

    Nothing is memory-mapped: a task's resident memory is the rows it asked for (one chunk of
    pairs), never pages of files it visited, and it does not grow with the parts' sizes. One file
    descriptor per (file, part) is kept until :meth:`close`.
    """

    def __init__(self, work: WorkDir, num_perm: int) -> None:
        self.work, self.num_perm = work, num_perm
        self._files: dict[tuple[str, int], tuple[int, int, np.dtype, int]] = {}  # fd, data offset, dtype, row items
        self._sets: dict[tuple[int, int], np.ndarray] = {}  # shingle sets read for this chunk

    def _file(self, what: str, part: int) -> tuple[int, int, np.dtype, int]:
        f = self._files.get((what, part))
        if f is None:
            if what == "sigs":
                path, offset, dtype, items = self.work.sigs(part), 0, np.dtype(np.uint32), self.num_perm
            elif what == "shingles":
                path, offset, dtype, items = self.work.shingles(part), 0, np.dtype(np.uint32), 1
            else:
                path = (self.work.shingle_offsets(part) if what == "shingle_offsets"
                        else self.work.docs(part) / f"{what}.npy")
                with open(path, "rb") as fh:  # the .npy header says where the data starts
                    major, _ = np.lib.format.read_magic(fh)
                    header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    _, _, dtype = header(fh)
                    offset = fh.tell()
                items = 1
            f = self._files[(what, part)] = (os.open(path, os.O_RDONLY), offset, np.dtype(dtype), items)
        return f

    def _read(self, what: str, part: int, first: int, count: int) -> np.ndarray:
        fd, offset, dtype, items = self._file(what, part)
        size = dtype.itemsize * items
        buf = os.pread(fd, size * count, offset + first * size)
        return np.frombuffer(buf, dtype).reshape(count, items) if items > 1 else np.frombuffer(buf, dtype)

    def gather(self, what: str, parts: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` of ``what`` (``sigs`` or a table column) in parts ``parts``."""
        if not len(rows):
            return np.zeros((0, self.num_perm) if what == "sigs" else 0, np.uint32 if what == "sigs" else np.uint64)
        # A document of a cluster is in several pairs of a chunk: read each row once.
        where, inverse = np.unique((parts.astype(np.uint64) << np.uint64(32)) | rows.astype(np.uint64),
                                   return_inverse=True)
        values = [self._read(what, int(w >> np.uint64(32)), int(w & np.uint64(0xFFFFFFFF)), 1) for w in where]
        return np.concatenate(values)[inverse]

    def shingle_set(self, part: int, row: int) -> np.ndarray:
        got = self._sets.get((part, row))
        if got is None:
            lo, hi = self._read("shingle_offsets", part, row, 2).tolist()
            got = self._sets[(part, row)] = self._read("shingles", part, lo, hi - lo)
        return got

    def close(self) -> None:
        """Drop the chunk's cached shingle sets and close the files."""
        for fd, *_ in self._files.values():
            os.close(fd)
        self._files.clear()
        self._sets.clear()


def _bucket_records(work: WorkDir, bucket: int, num_parts: int, passes: int, j: int) -> np.ndarray:
    """The band records of bucket shard ``bucket`` whose sub-bucket is ``j`` of ``passes``.

    In one pass the shard is read straight into one preallocated array (no second copy); in
    several, each file is read in chunks and only the records of sub-bucket ``j`` are kept.
    """
    paths = [work.bands(bucket, p) for p in range(num_parts)]
    if passes == 1:
        out = np.empty(sum(p.stat().st_size for p in paths) // BAND_RECORD.itemsize, BAND_RECORD)
        view, pos = memoryview(out.view(np.uint8)), 0
        for path in paths:
            with open(path, "rb") as fh:
                pos += fh.readinto(view[pos:])
        return out
    # Filled in place: an array of the expected share (grown if a pass gets more), read 5 MB at a time.
    total = sum(p.stat().st_size for p in paths) // BAND_RECORD.itemsize
    out = np.empty(int(total / passes * 1.1) + 1024, BAND_RECORD)
    n = 0
    for path in paths:
        with open(path, "rb") as fh:
            while len(rec := np.fromfile(fh, BAND_RECORD, count=1 << 18)):
                # all records of one band key land in the same sub-bucket
                mine = rec[(rec["key"] // np.uint64(num_parts)) % np.uint64(passes) == np.uint64(j)]
                if n + len(mine) > len(out):
                    out = np.resize(out, max(2 * len(out), n + len(mine)))
                out[n : n + len(mine)] = mine
                n += len(mine)
    return out[:n]


def verify_bucket(bucket: int, num_parts: int, cfg: DedupConfig, work: WorkDir,
                  memory_bytes: int = 2 << 30) -> dict[str, Any]:
    """Buckets stage for bucket shard ``bucket``: candidate pairs from shared band keys, verified,
    reduced to a spanning forest of the duplicate documents.

    When the shard's records would need more than ``memory_bytes``, it is read in several passes,
    each holding the band keys of one sub-bucket (the pairs do not depend on the pass count).
    """
    if not cfg.enabled:
        save_npy(work.edges(bucket), np.zeros((0, 2), np.uint64))
        return {"candidate_pairs": 0, "verified_pairs": 0, "forest_edges": 0, "passes": 0}
    records = sum(work.bands(bucket, p).stat().st_size for p in range(num_parts)) // BAND_RECORD.itemsize
    passes = max(1, math.ceil(records * _BYTES_PER_RECORD_IN_MEMORY / memory_bytes))
    found: list[np.ndarray] = []  # (a, b, row_a, row_b) per candidate pair
    for j in range(passes):
        rec = _bucket_records(work, bucket, num_parts, passes, j)
        idx = candidate_pair_index(rec["key"], rec["doc"], cfg.max_bucket_all_pairs)
        if len(idx):
            found.append(np.column_stack([rec["doc"][idx[:, 0]], rec["doc"][idx[:, 1]],
                                          rec["row"][idx[:, 0]].astype(np.uint64),
                                          rec["row"][idx[:, 1]].astype(np.uint64)]))
        del rec, idx
        release_free_memory()
    quads = np.concatenate(found) if found else np.zeros((0, 4), np.uint64)
    del found
    if passes > 1 and len(quads):  # a pair can share keys of several sub-buckets: keep one of each
        order = np.lexsort((quads[:, 1], quads[:, 0]))
        a, b = quads[order, 0], quads[order, 1]
        first = np.concatenate(([True], (a[1:] != a[:-1]) | (b[1:] != b[:-1])))
        quads = quads[order[first]]
        del order, a, b, first
        release_free_memory()
    keep = np.zeros(len(quads), bool)
    mapped = _Rows(work, cfg.num_perm)
    for lo in range(0, len(quads), _PAIR_CHUNK):
        q = quads[lo : lo + _PAIR_CHUNK]
        pa, pb = part_of(q[:, 0], num_parts), part_of(q[:, 1], num_parts)
        ra, rb = q[:, 2].astype(np.int64), q[:, 3].astype(np.int64)
        est = (mapped.gather("sigs", pa, ra) == mapped.gather("sigs", pb, rb)).mean(axis=1)
        same = mapped.gather("digest", pa, ra) == mapped.gather("digest", pb, rb)

        def exact(k: int, pa=pa, ra=ra, pb=pb, rb=rb) -> float:
            a, b = mapped.shingle_set(int(pa[k]), int(ra[k])), mapped.shingle_set(int(pb[k]), int(rb[k]))
            return jaccard_sorted(a, b)

        keep[lo : lo + len(q)], _ = verify_pairs(cfg, est, same, exact)
        mapped.close()
    nodes, keeper = components(quads[keep, 0], quads[keep, 1])
    forest = np.column_stack([nodes, keeper])[nodes != keeper]
    save_npy(work.edges(bucket), forest)
    return {"candidate_pairs": int(len(quads)), "verified_pairs": int(keep.sum()), "forest_edges": int(len(forest)),
            "passes": passes}


# ---------------------------------------------------------------------------------------------- components


def find_components(num_parts: int, num_buckets: int, work: WorkDir, fold_at: int = 1 << 22) -> dict[str, Any]:
    """Components stage (one task): the duplicate clusters over every bucket's forest edges.

    Writes, per part, the rows it loses (every member of a cluster but its smallest key), their
    keepers (key and row) and whether an earlier member has the same text (an exact copy).
    """
    # A pair sharing k bands is found, and kept as a forest edge, in up to k buckets: exact copies
    # (all 21 bands shared) would repeat ~21 times. The buckets' edges are therefore folded into
    # one forest whenever they outnumber it, so memory follows the duplicated documents, not
    # documents x shared bands.
    nodes, keeper = np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    pending: list[np.ndarray] = []
    num_edges = n_pending = 0
    for b in range(num_buckets):
        pending.append(np.load(work.edges(b)))
        num_edges += len(pending[-1])
        n_pending += len(pending[-1])
        if n_pending > max(len(nodes), fold_at) or b == num_buckets - 1:
            lost = nodes != keeper
            both = np.concatenate([np.column_stack([nodes[lost], keeper[lost]]), *pending])
            pending, n_pending = [], 0
            nodes, keeper = components(both[:, 0].copy(), both[:, 1].copy())
            del both, lost
            release_free_memory()
    parts = part_of(nodes, num_parts)
    rows = np.empty(len(nodes), np.int64)
    digest = np.empty(len(nodes), np.uint64)
    for p in np.unique(parts).tolist():  # one part's key and digest columns mapped at a time
        sel = np.nonzero(parts == p)[0]
        keys = column(work.docs(p), "key", mmap=True)
        rows[sel] = np.searchsorted(keys, nodes[sel])
        digest[sel] = column(work.docs(p), "digest", mmap=True)[rows[sel]]
        del keys
    exact = exact_copies(nodes, keeper, digest)
    keeper_row = rows[np.searchsorted(nodes, keeper)]
    lost = nodes != keeper
    for p in range(num_parts):
        sel = lost & (parts == p)
        save_npz(work.removed(p), row=rows[sel], key=nodes[sel], keeper=keeper[sel], keeper_row=keeper_row[sel],
                 exact=exact[sel])
    return {"removed": int(lost.sum()), "clusters": int(len(nodes) - lost.sum()), "forest_edges": num_edges}


# ---------------------------------------------------------------------------------------------- removals


def record_removals(part: int, num_parts: int, cfg: DedupConfig, work: WorkDir) -> dict[str, Any]:
    """Removals stage for one part: a ``removed.jsonl`` record per removed document, in key order.

    Each names the document, the document kept in its place, both sources, the MinHash estimate
    of their Jaccard similarity and (with the exact check) the exact one, computed against the kept
    document itself.
    """
    with np.load(work.removed(part)) as z:
        rows, keys, keepers, krows, exact = (z[k] for k in ("row", "key", "keeper", "keeper_row", "exact"))
    files = work.input_files() if len(rows) else []
    sources: dict[int, list[str]] = {}
    mapped = _Rows(work, cfg.num_perm)
    lines = 0
    with atomic_path(work.removed_records(part)) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for lo in range(0, len(rows), _PAIR_CHUNK):
            sl = slice(lo, lo + _PAIR_CHUNK)
            own = np.full(len(rows[sl]), part)
            kparts = part_of(keepers[sl], num_parts)
            est = (mapped.gather("sigs", own, rows[sl]) == mapped.gather("sigs", kparts, krows[sl])).mean(axis=1)
            src = mapped.gather("source", own, rows[sl])
            ksrc = mapped.gather("source", kparts, krows[sl])
            for k in range(len(est)):
                kp = int(kparts[k])
                for p in (part, kp):
                    if p not in sources:
                        sources[p] = json.loads((work.docs(p) / "sources.json").read_text())
                rec = {
                    "id": doc_id(int(keys[lo + k]), files),
                    "kept_id": doc_id(int(keepers[lo + k]), files),
                    "jaccard_estimate": round(float(est[k]), 4),
                    "exact_duplicate": bool(exact[lo + k]),  # an earlier document of the cluster has the same text
                    "source": sources[part][int(src[k])],
                    "kept_source": sources[kp][int(ksrc[k])],
                }
                if cfg.verify == "exact":
                    j = jaccard_sorted(mapped.shingle_set(part, int(rows[lo + k])),
                                       mapped.shingle_set(kp, int(krows[lo + k])))
                    rec["jaccard_exact"] = round(float(np.float32(j)), 4)
                fh.write(f"{int(keys[lo + k])}\t{json.dumps(rec, ensure_ascii=False)}\n")
                lines += 1
            mapped.close()
    return {"removed": lines}


def merge_removed_records(num_parts: int, work: WorkDir, out_path) -> int:
    """Merge the parts' records into ``removed.jsonl`` in input order (the same file for any task
    count), streaming: one open file and one line per part in memory."""
    ensure_open_files(num_parts + 64)
    handles = [open(work.removed_records(p), encoding="utf-8") for p in range(num_parts)]  # noqa: SIM115

    def keyed(fh) -> Iterator[tuple[int, str]]:
        for line in fh:
            k, _, rec = line.partition("\t")
            yield int(k), rec

    n = 0
    try:
        with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
            for _, rec in heapq.merge(*(keyed(h) for h in handles)):
                out.write(rec)
                n += 1
    finally:
        for h in handles:
            h.close()
    return n
