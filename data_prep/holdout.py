"""The split stage's algorithm: a code for every clean row, and what each step removed.

Codes: ``TRAIN``/``VAL`` for kept documents; ``DUP`` (fuzzy dedup), ``DECONTAM_HASH`` (a training
document whose normalized text hashes like a holdout document's) and ``DECONTAM_NGRAM`` (shares an
n-gram with an evaluation example) for dropped ones. The holdout is drawn by a hash of each
document's id (a ratio, or the ``count`` smallest draws), so it never depends on the task count.

Streaming over parts: memory is one part's table plus the holdout's digests (and, with
``count``, the ``count`` smallest draws), never the whole corpus.
"""
from __future__ import annotations

import json

import numpy as np

from data_prep.atomic import save_npy
from data_prep.doc_table import column
from data_prep.layout import WorkDir, load_removed
from data_prep.stats import PrepStats

SPLITS = ("train", "val")
TRAIN, VAL, DUP, DECONTAM_HASH, DECONTAM_NGRAM = 0, 1, -1, -2, -3


def _base_codes(work: WorkDir, part: int, ratio: float, cut: float | None) -> np.ndarray:
    """TRAIN / VAL / DUP of a part's rows (before decontamination)."""
    u = column(work.docs(part), "holdout_u")
    codes = np.zeros(len(u), np.int8)
    codes[load_removed(work, part)[0]] = DUP
    val = u <= cut if cut is not None else u < ratio
    codes[(codes == TRAIN) & val] = VAL
    return codes


def holdout_cut(work: WorkDir, num_parts: int, count: int) -> float:
    """The largest draw among the ``count`` smallest draws of the documents dedup keeps (-1: none)."""
    if count <= 0:
        return -1.0
    best = np.zeros(0, np.float64)
    for p in range(num_parts):
        u = column(work.docs(p), "holdout_u")
        alive = np.ones(len(u), bool)
        alive[load_removed(work, p)[0]] = False
        both = np.concatenate([best, u[alive]])
        best = np.partition(both, count - 1)[:count] if len(both) > count else both
    return float(best.max()) if len(best) else -1.0


def assign_splits(work: WorkDir, num_parts: int, ratio: float, count: int | None) -> tuple[PrepStats, dict[str, int]]:
    """Write every part's split codes; return the per-source statistics and train bytes per source."""
    cut = holdout_cut(work, num_parts, count) if count is not None else None
    val_digests = np.concatenate([column(work.docs(p), "norm_digest")[_base_codes(work, p, ratio, cut) == VAL]
                                  for p in range(num_parts)]) if num_parts else np.zeros(0, np.uint64)
    val_digests = np.unique(val_digests)
    stats = PrepStats()
    train_bytes: dict[str, int] = {}
    for p in range(num_parts):
        codes = _base_codes(work, p, ratio, cut)
        digest = column(work.docs(p), "norm_digest")
        codes[(codes == TRAIN) & np.isin(digest, val_digests)] = DECONTAM_HASH
        codes[(codes >= 0) & column(work.docs(p), "contaminated")] = DECONTAM_NGRAM
        save_npy(work.split_codes(p), codes)
        names = json.loads((work.docs(p) / "sources.json").read_text())
        source, nbytes = column(work.docs(p), "source"), column(work.docs(p), "nbytes")
        split_stats(stats, names, source, nbytes, codes, load_removed(work, p))
        per_src = np.bincount(source[codes == TRAIN], weights=nbytes[codes == TRAIN], minlength=len(names))
        for k in np.nonzero(per_src)[0]:
            train_bytes[names[k]] = train_bytes.get(names[k], 0) + int(per_src[k])
    return stats, dict(sorted(train_bytes.items()))


def split_stats(stats: PrepStats, names: list[str], source: np.ndarray, nbytes: np.ndarray, codes: np.ndarray,
                removed: tuple[np.ndarray, np.ndarray]) -> None:
    """Per-source documents and bytes in/out of exact dedup, fuzzy dedup, decontamination, split and
    holdout for one part, from its split codes (array sums per source, not a loop per document)."""
    if not len(codes):
        return

    def add(step: str, key: str, mask: np.ndarray) -> None:
        docs = np.bincount(source[mask], minlength=len(names))
        size = np.bincount(source[mask], weights=nbytes[mask], minlength=len(names))
        for k in np.nonzero(docs)[0]:
            stats.add(step, names[k], key, int(docs[k]), int(size[k]))

    exact = np.zeros(len(codes), bool)
    rows, is_exact = removed
    exact[rows[is_exact]] = True
    near = (codes == DUP) & ~exact
    after_dedup = codes != DUP
    kept = codes >= 0
    decontam_drops = {"holdout_hash_match": codes == DECONTAM_HASH, "eval_ngram_match": codes == DECONTAM_NGRAM}
    for step, into, out, drops in (
        ("exact_dedup", np.ones(len(codes), bool), ~exact, {"exact_duplicate": exact}),
        ("fuzzy_dedup", ~exact, after_dedup, {"near_duplicate": near}),
        ("decontam", after_dedup, kept, decontam_drops),
        ("split", kept, kept, {}),
    ):
        if not into.any():
            continue
        add(step, "in", into)
        for reason, mask in drops.items():
            if mask.any():
                stats.drop(step, reason, int(mask.sum()))
        add(step, "out", out)
    if (codes == VAL).any():
        add("holdout_val", "out", codes == VAL)
