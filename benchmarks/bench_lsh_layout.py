"""LSH band layout vs recall right at the threshold: planted pairs at Jaccard 0.80-0.85, per layout.

    python benchmarks/bench_lsh_layout.py [--pairs 5000] [--controls 1000] [--background 3000] \
        [--layouts 128:16x8,128:21x6,...] [--corpus data/demo_corpus]

With the exact Jaccard check precision is free and recall is set by the LSH layout: a pair at
Jaccard ``s`` shares at least one band with probability ``1 - (1 - s^r)^b``. This plants document
pairs whose word-13-gram shingle sets have an exact Jaccard spread uniformly over ``--planted-range``
(0.80-0.85), control pairs over ``--control-range`` (0.60-0.75, must never be removed at threshold
0.8) and unrelated background documents, all built from random words of a large vocabulary (so no
shingle is shared by chance). Each variant is its base document with runs of words replaced: a run
of ``m`` words touches ``m + 12`` of the 13-gram windows, so the number of changed windows, and with
it the Jaccard, is set exactly; the Jaccard kept for every pair is the one measured with
``jaccard_sorted`` over the ``shingle_hashes`` of the two texts.

For every layout (``num_perm:BANDSxROWS``) it runs ``signatures``, ``band_keys`` and
``candidate_pairs`` in memory, verifies each candidate with the exact Jaccard and reports: recall on
the planted pairs (found as a candidate and verified), precision of the removals, control pairs
that became candidates (verification cost only) or were removed (must be 0), candidate pairs per
document, exact checks and their CPU time per 1k documents, and MB/s per core of MinHash + banding
(shingles, signatures, band keys, candidate pairs) and of the whole in-memory dedup (plus the sorted
shingle sets and the exact checks); CPU time of this process, one rensa thread. ``--corpus`` adds
the same figures on a real corpus (normalized, short documents dropped), where candidate pairs at
mid similarity (templates, licenses) are what a wider layout costs; its recall is relative to the
union of all layouts' verified pairs. Also prints the theoretical S-curve at s = 0.80 and 0.85.

Prints a table and, last, one JSON object: ``layouts`` keyed by ``num_perm:BxR``, and
``cheapest_passing``: of the layouts with planted recall and P(found | s = 0.80) at least
``--target-recall`` (and precision 1, no control removed), the one with the fewest permutations,
then the fewest candidate pairs per document (on ``--corpus`` when given), then the fewest bands.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before rensa is imported: per-core figures

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.dedup_core import (  # noqa: E402 - after the sys.path insert above
    DedupConfig,
    band_keys,
    candidate_pairs,
    jaccard_sorted,
    optimal_bands,
    shingle_hashes,
    signatures,
    text_batches,
)

DEFAULT_LAYOUTS = ("128:9x13,128:16x8,128:18x7,128:18x6,128:20x6,128:21x6,128:25x5,128:32x4,"
                   "256:25x10,256:30x8,256:32x8,256:36x7,256:42x6")
NGRAM_SPAN = 12  # a 13-gram window covers a word and the 12 words on either side of its start


def s_curve(s: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """Probability that a pair at Jaccard ``s`` shares at least one of ``bands`` bands of ``rows`` rows."""
    return 1.0 - (1.0 - np.asarray(s, float) ** rows) ** bands


def parse_layouts(spec: str) -> list[tuple[int, int, int]]:
    """``"128:16x8,256:32x8"`` -> [(num_perm, bands, rows), ...]."""
    out = []
    for item in spec.split(","):
        perm, _, br = item.strip().partition(":")
        b, _, r = br.partition("x")
        num_perm, bands, rows = int(perm), int(b), int(r)
        if bands * rows > num_perm:
            raise ValueError(f"layout {item}: {bands}x{rows} needs more than {num_perm} permutations")
        out.append((num_perm, bands, rows))
    return out


# ------------------------------------------------------------------------------------------ corpus


@dataclass
class Planted:
    """The synthetic corpus: texts plus the planted and control pairs (indices into ``texts``)."""

    texts: list[str]
    pairs: np.ndarray  # (n, 2) planted near-duplicates, exact J in the planted range
    pair_j: np.ndarray
    controls: np.ndarray  # (n, 2) pairs below the threshold
    control_j: np.ndarray
    sets: list[np.ndarray] = field(default_factory=list)


def make_vocab(rng: np.random.Generator, size: int) -> np.ndarray:
    """``size`` distinct lowercase words of 2-10 letters (normalization leaves them unchanged)."""
    words: set[str] = set()
    while len(words) < size:
        lens = rng.integers(2, 11, size)
        letters = rng.integers(97, 123, (size, 10), dtype=np.uint8)
        words.update(bytes(row[:n]).decode() for row, n in zip(letters, lens, strict=True))
    return np.array(sorted(words)[:size], dtype=object)


def edit_runs(rng: np.random.Generator, words: int, changed: int) -> np.ndarray:
    """Positions to replace so that exactly ``changed`` 13-gram windows of a ``words``-word document
    change: runs of ``m`` words, each touching ``m + 12`` windows, at least 12 words apart and away
    from the ends (so no window sees two runs and every run touches all its windows)."""
    max_runs = max(1, min(8, changed // (NGRAM_SPAN + 1)))
    q = int(rng.integers(1, max_runs + 1))
    total = changed - NGRAM_SPAN * q  # replaced words over all runs
    cuts = np.sort(rng.choice(np.arange(1, total), q - 1, replace=False)) if q > 1 else np.zeros(0, int)
    lengths = np.diff(np.concatenate(([0], cuts, [total])))
    slack = words - (total + NGRAM_SPAN * (q - 1) + 2 * NGRAM_SPAN)
    if slack < 0:
        raise ValueError("document too short for this Jaccard")
    gaps = np.diff(np.concatenate(([0], np.sort(rng.integers(0, slack + 1, q)))))
    pos, start = [], NGRAM_SPAN
    for m, g in zip(lengths, gaps, strict=True):
        start += int(g)
        pos.append(np.arange(start, start + m))
        start += int(m) + NGRAM_SPAN
    return np.concatenate(pos)


def variant(rng: np.random.Generator, base: np.ndarray, target_j: float, vocab_size: int) -> np.ndarray:
    """A copy of ``base`` (word ids) whose 13-gram set has Jaccard ~``target_j`` with it:
    ``J = (n - d) / (n + d)`` for ``d`` changed windows out of ``n``."""
    n = len(base) - NGRAM_SPAN
    d = int(np.floor(n * (1 - target_j) / (1 + target_j)))  # floor: J lands at or just above the target
    out = base.copy()
    pos = edit_runs(rng, len(base), max(d, NGRAM_SPAN + 1))
    out[pos] = (base[pos] + rng.integers(1, vocab_size, len(pos))) % vocab_size  # a different word
    return out


def sorted_unique(x: np.ndarray) -> np.ndarray:
    """Sorted unique values (np.unique takes numpy's hash path, several times slower)."""
    x = np.sort(x)
    return x[np.concatenate(([True], x[1:] != x[:-1]))] if len(x) else x


def sorted_sets(texts: list[str], cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Shingle hashes, offsets and each document's sorted unique shingle set (all 64 bits)."""
    h, off, _ = shingle_hashes(texts, cfg)
    return h, off, [sorted_unique(h[off[k] : off[k + 1]]) for k in range(len(texts))]


def make_pairs(rng: np.random.Generator, vocab: np.ndarray, count: int, lo: float, hi: float,
               words: tuple[int, int], cfg: DedupConfig) -> tuple[list[np.ndarray], np.ndarray]:
    """``count`` (base, variant) word-id pairs whose measured Jaccard lies in [lo, hi], spread uniformly."""
    kept: list[np.ndarray] = []
    js: list[float] = []
    while len(kept) < 2 * count:
        want = count - len(js)
        batch, targets = [], rng.uniform(lo, hi, want + want // 10 + 4)
        for t in targets:
            # Short documents cannot take the runs a low Jaccard needs; the floor keeps n >= 100.
            base = rng.integers(0, len(vocab), int(rng.integers(max(words[0], 120), words[1] + 1)))
            batch += [base, variant(rng, base, float(t), len(vocab))]
        _, _, sets = sorted_sets([" ".join(vocab[ids]) for ids in batch], cfg)
        for k in range(0, len(batch), 2):
            j = jaccard_sorted(sets[k], sets[k + 1])
            if lo <= j <= hi and len(js) < count:
                kept += batch[k : k + 2]
                js.append(j)
    return kept, np.array(js)


def build_planted(args: argparse.Namespace, cfg: DedupConfig) -> Planted:
    """Planted pairs, control pairs and background documents, shuffled together."""
    rng = np.random.default_rng(args.seed)
    vocab = make_vocab(rng, args.vocab)
    words = tuple(int(x) for x in args.words.split(","))
    plo, phi = (float(x) for x in args.planted_range.split(","))
    clo, chi = (float(x) for x in args.control_range.split(","))
    planted, pj = make_pairs(rng, vocab, args.pairs, plo, phi, words, cfg)
    control, cj = make_pairs(rng, vocab, args.controls, clo, chi, words, cfg)
    sizes = rng.integers(words[0], words[1] + 1, args.background)
    background = [rng.integers(0, len(vocab), int(w)) for w in sizes]
    docs = planted + control + background
    order = rng.permutation(len(docs))  # position of doc k in the shuffled corpus
    texts: list[str] = [""] * len(docs)
    for k, ids in enumerate(docs):
        texts[order[k]] = " ".join(vocab[ids])
    pos = order.reshape(-1)

    def pairs_at(start: int, n: int) -> np.ndarray:
        p = np.stack([pos[start : start + 2 * n : 2], pos[start + 1 : start + 2 * n : 2]], 1)
        return np.sort(p, axis=1)

    return Planted(texts, pairs_at(0, args.pairs), pj, pairs_at(2 * args.pairs, args.controls), cj)


def load_corpus(corpus: Path) -> list[str]:
    """Documents of a corpus after normalization and the short-document filter (what dedup sees)."""
    from data_prep.filters import ShortDocumentFilter
    from data_prep.normalize import Normalize
    from data_prep.readers import DocumentReader, expand_inputs

    docs = DocumentReader(expand_inputs([str(corpus / "train")]), corpus).run()
    return [d.text for d in ShortDocumentFilter(200).run(Normalize().run(docs))]


# ---------------------------------------------------------------------------------------- measuring


def cpu() -> float:
    return time.process_time()


@dataclass
class Prepared:
    """Per corpus: the layout-independent work, timed once (shingles and sets) or per num_perm."""

    mb: float
    sets: list[np.ndarray]
    shingle_cpu: float
    sets_cpu: float
    sigs: dict[int, np.ndarray]
    sig_cpu: dict[int, float]


def prepare(texts: list[str], perms: set[int], seed: int) -> Prepared:
    """Shingles, sorted sets (what the exact check compares) and signatures for each num_perm, in batches."""
    shingle_cpu = sets_cpu = 0.0
    sig_cpu = dict.fromkeys(perms, 0.0)
    parts: dict[int, list[np.ndarray]] = {p: [] for p in perms}
    sets: list[np.ndarray] = []
    for lo, hi in text_batches(texts):
        c0 = cpu()
        h, off, _ = shingle_hashes(texts[lo:hi], DedupConfig(seed=seed))
        c1 = cpu()
        sets += [sorted_unique(h[off[k] : off[k + 1]]) for k in range(hi - lo)]
        c2 = cpu()
        shingle_cpu, sets_cpu = shingle_cpu + c1 - c0, sets_cpu + c2 - c1
        for p in perms:
            t0 = cpu()
            parts[p].append(signatures(h, off, DedupConfig(num_perm=p, seed=seed)))
            sig_cpu[p] += cpu() - t0
    sigs = {p: np.concatenate(v) for p, v in parts.items()}
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    return Prepared(mb, sets, shingle_cpu, sets_cpu, sigs, dict(sorted(sig_cpu.items())))


@dataclass
class LayoutRun:
    """One layout on one corpus: candidate pairs, verified edges, removals and CPU seconds."""

    docs: int
    cands: np.ndarray
    edges: np.ndarray
    removed: set[int]
    band_cpu: float  # band keys + candidate pairs
    verify_cpu: float  # exact checks
    base_cpu: float  # shingles + signatures + band_cpu
    dedup_cpu: float  # base_cpu + sorted sets + verify_cpu
    mb: float

    def figures(self, prefix: str = "") -> dict[str, float | int]:
        """Per-document and per-MB figures, keys prefixed with ``prefix``."""
        return {
            f"{prefix}candidates_per_doc": round(len(self.cands) / self.docs, 4),
            f"{prefix}exact_checks_per_1k_docs": round(1000 * len(self.cands) / self.docs, 1),
            f"{prefix}verify_cpu_ms_per_1k_docs": round(1e6 * self.verify_cpu / self.docs, 2),
            f"{prefix}verified_pairs": len(self.edges),
            f"{prefix}removed_docs": len(self.removed),
            f"{prefix}band_cpu_s": round(self.band_cpu, 4),
            f"{prefix}minhash_banding_mb_s_per_core": round(self.mb / self.base_cpu, 2),
            f"{prefix}dedup_mb_s_per_core": round(self.mb / self.dedup_cpu, 2),
        }


def run_layout(prep: Prepared, num_perm: int, bands: int, rows: int, threshold: float) -> LayoutRun:
    """Candidates, exact checks and removals of one layout, with their CPU time."""
    n = len(prep.sets)
    cfg = DedupConfig(num_perm=num_perm, bands=bands, rows=rows, threshold=threshold)
    c0 = cpu()
    keys = band_keys(prep.sigs[num_perm], bands, rows)
    cands = candidate_pairs(keys.reshape(-1), np.repeat(np.arange(n, dtype=np.uint64), bands), cfg.max_bucket_all_pairs)
    c1 = cpu()
    j = np.fromiter((jaccard_sorted(prep.sets[a], prep.sets[b]) for a, b in cands.tolist()), float, len(cands))
    c2 = cpu()
    edges = cands[j >= threshold].astype(np.int64)
    base = prep.shingle_cpu + prep.sig_cpu[num_perm] + (c1 - c0)
    return LayoutRun(n, cands.astype(np.int64), edges, removed_docs(edges), c1 - c0, c2 - c1, base,
                     base + prep.sets_cpu + (c2 - c1), prep.mb)


def removed_docs(edges: np.ndarray) -> set[int]:
    """Every member of a connected component except its first document (what dedup removes)."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x for x in parent if find(x) != x}


def pair_hits(pairs: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Which rows of ``pairs`` (a < b) occur among ``found`` (a < b)."""
    if not len(found):
        return np.zeros(len(pairs), bool)

    def code(p: np.ndarray) -> np.ndarray:
        return (p[:, 0].astype(np.int64) << 32) | p[:, 1].astype(np.int64)

    return np.isin(code(pairs), code(found))


def recall_by_bin(j: np.ndarray, found: np.ndarray, width: float = 0.01) -> dict[str, float]:
    """Recall per Jaccard bin of ``width`` (the low end of each bin as its name)."""
    lo = np.floor(j / width + 1e-9) * width
    return {f"{b:.2f}": round(float(found[lo == b].mean()), 4) for b in np.unique(lo)}


def label(num_perm: int, bands: int, rows: int) -> str:
    """Which ``optimal_bands(t, num_perm, 0.05, 0.95)`` thresholds give this layout (the current rule)."""
    ts = [t for t in (0.7, 0.75, 0.8) if optimal_bands(t, num_perm, 0.05, 0.95) == (bands, rows)]
    return ("optimal_bands(" + "/".join(f"{t:g}" for t in ts) + ")") if ts else ""


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=5000, help="planted near-duplicate pairs")
    p.add_argument("--controls", type=int, default=1000, help="control pairs below the threshold")
    p.add_argument("--background", type=int, default=3000, help="unrelated documents")
    p.add_argument("--planted-range", default="0.80,0.85")
    p.add_argument("--control-range", default="0.60,0.75")
    p.add_argument("--words", default="150,1000", help="document length range in words")
    p.add_argument("--vocab", type=int, default=100_000)
    p.add_argument("--threshold", type=float, default=0.8, help="decision threshold (exact Jaccard)")
    p.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="comma-separated num_perm:BANDSxROWS")
    p.add_argument("--target-recall", type=float, default=0.995)
    p.add_argument("--corpus", default=None, help="also measure on this corpus (RedPajama layout)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (MinHash keeps DedupConfig's seed)")
    args = p.parse_args(argv)
    layouts = parse_layouts(args.layouts)
    mh_seed = DedupConfig().seed
    perms = {lay[0] for lay in layouts}

    t0 = time.perf_counter()
    pl = build_planted(args, DedupConfig())
    gen_s = time.perf_counter() - t0
    prep = prepare(pl.texts, perms, mh_seed)
    real = None
    if args.corpus:
        texts = load_corpus(Path(args.corpus))
        real = prepare(texts, perms, mh_seed)

    results: dict[str, dict] = {}
    real_runs: dict[str, LayoutRun] = {}
    planted_members = set(pl.pairs.reshape(-1).tolist())
    for num_perm, bands, rows in layouts:
        name = f"{num_perm}:{bands}x{rows}"
        r = run_layout(prep, num_perm, bands, rows, args.threshold)
        found = pair_hits(pl.pairs, r.edges)
        res: dict = {
            "num_perm": num_perm, "bands": bands, "rows": rows, "rule": label(num_perm, bands, rows),
            "theory_p080": float(s_curve(0.80, bands, rows)), "theory_p085": float(s_curve(0.85, bands, rows)),
            "theory_expected_recall": float(np.mean(s_curve(pl.pair_j, bands, rows))),
            "recall": float(found.mean()), "missed_pairs": int((~found).sum()),
            "recall_by_j": recall_by_bin(pl.pair_j, found),
            "missed_pair_j": sorted(round(float(x), 4) for x in pl.pair_j[~found])[:20],  # the first 20
            "precision": len(r.removed & planted_members) / len(r.removed) if r.removed else 1.0,
            "control_candidates": int(pair_hits(pl.controls, r.cands).sum()),
            "control_removed": int(sum(1 for a, b in pl.controls.tolist() if a in r.removed or b in r.removed)),
            **r.figures(),
        }
        if real is not None:
            real_runs[name] = run_layout(real, num_perm, bands, rows, args.threshold)
            res.update(real_runs[name].figures("real_"))
        results[name] = res
    if real is not None:
        # No exact all-pairs reference here: the union of every layout's removals stands in for it
        # (a 32x4 layout finds a pair at J = 0.8 with probability 1 - 1e-7).
        union = set().union(*(rr.removed for rr in real_runs.values()))
        for name, rr in real_runs.items():
            results[name]["real_recall_vs_union"] = round(len(rr.removed) / len(union), 4) if union else 1.0

    # Cheapest passing layout: fewer permutations first (signatures dominate the CPU time), then fewer
    # candidate pairs (real corpus when given: that is where a wide layout costs exact checks).
    cand_key = "real_candidates_per_doc" if real is not None else "candidates_per_doc"
    passing = [n for n, r in results.items()
               if min(r["recall"], r["theory_p080"]) >= args.target_recall and r["precision"] == 1.0
               and r["control_removed"] == 0]
    best = min(passing, key=lambda n: (results[n]["num_perm"], results[n][cand_key], results[n]["bands"]), default=None)

    j, c = pl.pair_j, pl.control_j
    print(f"planted corpus: {len(pl.texts)} documents, {prep.mb:.1f} MB ({gen_s:.1f} s to build); "
          f"{len(pl.pairs)} pairs at exact J {j.min():.3f}-{j.max():.3f} (mean {j.mean():.3f}), "
          f"{len(pl.controls)} controls at J {c.min():.3f}-{c.max():.3f}, threshold {args.threshold}")
    print(f"CPU s shared by all layouts: shingles {prep.shingle_cpu:.2f}, sorted sets {prep.sets_cpu:.2f}, "
          + ", ".join(f"signatures {k} perms {v:.2f}" for k, v in prep.sig_cpu.items()))
    if real is not None:
        print(f"real corpus {args.corpus}: {len(real.sets)} documents, {real.mb:.1f} MB; "
              + ", ".join(f"signatures {k} perms {v:.2f} CPU s" for k, v in real.sig_cpu.items()))
    print_table(results, real is not None)
    print("P(.80), P(.85): S-curve 1-(1-s^r)^b; E[rec]: its mean over the planted pairs' exact J; "
          "recall, miss: planted pairs found and verified; prec: removals that are planted duplicates; "
          "ctlC/ctlR: control pairs that became candidates / were removed; MH+band, dedup: MB/s per core "
          "(dedup adds the sorted sets and exact checks); real: the --corpus figures, rec/U: removals over "
          "the union of all layouts' removals")
    if best is not None:
        print(f"cheapest layout with planted recall and P(0.80) >= {args.target_recall}: {best} "
              f"({results[best][cand_key]} {cand_key.replace('_', ' ')})")
    else:
        print(f"no layout reaches recall {args.target_recall}")
    out = {
        "planted": {"docs": len(pl.texts), "mb": round(prep.mb, 3), "pairs": len(pl.pairs),
                    "controls": len(pl.controls), "pair_j_min": round(float(j.min()), 4),
                    "pair_j_max": round(float(j.max()), 4), "control_j_max": round(float(c.max()), 4),
                    "threshold": args.threshold, "shingle_cpu_s": round(prep.shingle_cpu, 3),
                    "signature_cpu_s": {str(k): round(v, 3) for k, v in prep.sig_cpu.items()}},
        "real": {"corpus": args.corpus, "docs": len(real.sets), "mb": round(real.mb, 3)} if real is not None else None,
        "layouts": results,
        "cheapest_passing": best,
    }
    print(json.dumps(out))
    return out


COLUMNS = [  # (header, key, format)
    ("rule", "rule", ">22s"), ("P(.80)", "theory_p080", "7.4f"), ("P(.85)", "theory_p085", "8.5f"),
    ("E[rec]", "theory_expected_recall", "7.4f"), ("recall", "recall", "7.4f"), ("miss", "missed_pairs", "5d"),
    ("prec", "precision", "5.3f"), ("ctlC", "control_candidates", "5d"), ("ctlR", "control_removed", "4d"),
    ("cand/doc", "candidates_per_doc", "8.4f"), ("chk/1k", "exact_checks_per_1k_docs", "7.1f"),
    ("vfy ms/1k", "verify_cpu_ms_per_1k_docs", "9.2f"), ("MH+band", "minhash_banding_mb_s_per_core", "8.2f"),
    ("dedup", "dedup_mb_s_per_core", "6.2f"),
]
REAL_COLUMNS = [
    ("real c/doc", "real_candidates_per_doc", "10.4f"), ("rm", "real_removed_docs", "4d"),
    ("rec/U", "real_recall_vs_union", "6.4f"), ("vfy ms/1k", "real_verify_cpu_ms_per_1k_docs", "9.2f"),
    ("MH+band", "real_minhash_banding_mb_s_per_core", "8.2f"), ("dedup", "real_dedup_mb_s_per_core", "6.2f"),
]


def print_table(results: dict[str, dict], real: bool) -> None:
    """One row per layout; the real-corpus columns after a bar."""
    cols = COLUMNS + ([("|", None, "1s")] + REAL_COLUMNS if real else [])

    def width(fmt: str) -> int:
        return int(fmt.lstrip(">").split(".")[0].rstrip("sdf"))

    print(f"{'layout':10s} " + " ".join(f"{h:>{width(f)}s}" for h, _, f in cols))
    for name, r in results.items():
        print(f"{name:10s} " + " ".join("|" if k is None else format(r[k], f) for _, k, f in cols))


if __name__ == "__main__":
    main()
