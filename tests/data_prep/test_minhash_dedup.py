"""Fuzzy dedup: band layout, planted ground truth (precision/recall), LSH vs exact all-pairs, tasks."""
import json

import numpy as np
import pytest

from data_prep.minhash_dedup import (
    DedupConfig,
    DedupPaths,
    candidate_pairs,
    clusters,
    dedup_in_memory,
    jaccard_sorted,
    optimal_bands,
    shingle_hashes,
)

N_WORDS = 1000


def _shingles(words, n=13):
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def true_jaccard(a, b):
    sa, sb = _shingles(a), _shingles(b)
    return len(sa & sb) / len(sa | sb)


def planted_corpus(seed=0, groups=60):
    """Originals of random words; per group one variant with ``s`` substitutions spaced >= 13 apart.

    With 1000 words, s substitutions give word-13-gram Jaccard (988 - 13s) / (988 + 13s):
    s = 0 (exact copy) 1.0, 1: 0.974, 3: 0.924, 5: 0.877, 6: 0.854, 7: 0.832 (duplicates) and
    s = 9: 0.788, 10: 0.767, 12: 0.727 (near-misses just below 0.8).
    """
    rng = np.random.default_rng(seed)
    vocab = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 9))) for _ in range(30000)]
    texts, truth, planted = [], set(), []
    subs = [0, 1, 3, 5, 6, 7, 9, 10, 12]
    for g in range(groups):
        words = [vocab[i] for i in rng.integers(0, len(vocab), N_WORDS)]
        texts.append(" ".join(words))
        s = subs[g % len(subs)]
        variant = list(words)
        for k in range(s):
            pos = 40 + k * 75  # far apart: each substitution breaks 13 distinct shingles
            variant[pos] = vocab[rng.integers(0, len(vocab))] + "x"
        j = true_jaccard(words, variant)
        planted.append((s, j))
        if j >= 0.8:
            truth.add(len(texts))
        texts.append(" ".join(variant))
    return texts, truth, planted


def test_band_layout_is_derived_from_the_threshold():
    # Equal weights reproduce SlimPajama's b=9, r=13 for threshold 0.8 and 128 permutations.
    assert optimal_bands(0.8, 128) == (9, 13)
    assert DedupConfig(verify="none").band_layout() == (9, 13)
    b, r = DedupConfig().band_layout()  # with the exact check, misses weigh more: more, shorter bands
    assert b * r <= 128 and b > 9 and 1 - (1 - 0.83**r) ** b > 0.98
    assert DedupConfig(bands=20, rows=5).band_layout() == (20, 5)
    with pytest.raises(ValueError, match="bands"):
        DedupConfig(bands=20, rows=7)


def test_planted_duplicates_precision_and_recall(tmp_path):
    texts, truth, planted = planted_corpus(groups=180)
    assert any(0.8 < j < 0.84 for _, j in planted) and any(0.78 < j < 0.8 for _, j in planted)
    removed = dedup_in_memory(texts, DedupConfig(), tmp_path)
    tp = len(removed & truth)
    precision, recall = tp / max(1, len(removed)), tp / len(truth)
    print(f"planted: {len(truth)} duplicates, removed {len(removed)}, precision {precision:.3f} recall {recall:.3f}")
    assert precision >= 0.98 and recall >= 0.98
    rows = [json.loads(line) for line in (tmp_path / "removed.jsonl").read_text().splitlines()]
    assert {int(r["id"]) for r in rows} == removed
    for r in rows:  # the kept document is the earlier one of its group; the estimate is close to the truth
        assert int(r["kept_id"]) == int(r["id"]) - 1
        assert abs(r["jaccard_estimate"] - r["jaccard_exact"]) < 0.15 and r["jaccard_exact"] >= 0.8
    assert any(r["exact_duplicate"] for r in rows)


def test_without_check_lsh_flags_near_misses(tmp_path):
    """SlimPajama's recipe (no Jaccard check) removes documents below the threshold; ours does not."""
    texts, truth, _ = planted_corpus(seed=1)
    loose = dedup_in_memory(texts, DedupConfig(verify="none", bands=16, rows=8), tmp_path / "a")
    checked = dedup_in_memory(texts, DedupConfig(bands=16, rows=8), tmp_path / "b")
    assert loose - truth and not checked - truth


def test_same_result_for_any_number_of_tasks(tmp_path):
    texts, _, _ = planted_corpus(groups=27)
    one = dedup_in_memory(texts, DedupConfig(), tmp_path / "one", num_tasks=1)
    three = dedup_in_memory(texts, DedupConfig(), tmp_path / "three", num_tasks=3)
    assert one == three
    assert (tmp_path / "one/removed.jsonl").read_text() == (tmp_path / "three/removed.jsonl").read_text()
    # bounded memory: each bucket task loads only its shard of the band records
    sizes = [sum(DedupPaths(tmp_path / "three").bands(b, p).stat().st_size for p in range(3)) for b in range(3)]
    assert max(sizes) < 0.5 * sum(sizes)


def test_char_shingles_and_short_documents(tmp_path):
    base = " ".join(f"word{i}" for i in range(400))
    texts = [base, base.replace("word200 ", "changed ", 1), "tiny text", "tiny text", "other words entirely here"]
    removed = dedup_in_memory(texts, DedupConfig(shingle="char", ngram=13), tmp_path)
    assert removed == {1, 3}
    h, off, _ = shingle_hashes(["a b c", ""], DedupConfig())
    assert np.diff(off).tolist() == [1, 0]  # a short document is one shingle; an empty one none


def test_candidate_pairs_star_for_large_buckets():
    keys = np.array([5] * 40 + [7, 7], np.uint64)
    docs = np.arange(42, dtype=np.uint64)
    pairs = candidate_pairs(keys, docs, all_pairs_up_to=32)
    assert len(pairs) == 39 + 38 + 1 and {tuple(p) for p in pairs.tolist()} >= {(0, 39), (38, 39), (40, 41)}
    keeper = clusters(np.array([3, 1, 8], np.uint64), np.array([1, 2, 9], np.uint64))
    assert keeper == {1: 1, 2: 1, 3: 1, 8: 8, 9: 8}
    assert jaccard_sorted(np.array([1, 2, 3]), np.array([2, 3, 4])) == 0.5


def test_lsh_agrees_with_exact_all_pairs_on_the_demo_corpus(demo_corpus, tmp_path):
    """All pairs with exact Jaccard >= 0.8 (sparse shingle-incidence product) vs the LSH pipeline."""
    sparse = pytest.importorskip("scipy.sparse")
    from data_prep.readers import DocumentReader, expand_inputs

    docs = list(DocumentReader(expand_inputs([str(demo_corpus / "train")]), demo_corpus).run())
    texts = [d.text for d in docs]
    cfg = DedupConfig()
    h, off, _ = shingle_hashes(texts, cfg)
    h32 = (h >> np.uint64(32)).astype(np.uint32)  # the pipeline's exact check uses 32-bit shingles too
    rows = np.repeat(np.arange(len(texts)), np.diff(off))
    uniq, col = np.unique(h32, return_inverse=True)
    m = sparse.csr_matrix((np.ones(len(col), np.float32), (rows, col)), shape=(len(texts), len(uniq)))
    m.data[:] = 1
    m.sum_duplicates()
    m.data[:] = 1
    inter = (m @ m.T).tocoo()
    size = np.asarray(m.sum(axis=1)).ravel()
    a, b, n = inter.row, inter.col, inter.data
    keep = (a < b) & (n / (size[a] + size[b] - n) >= cfg.threshold)
    keeper = clusters(a[keep].astype(np.uint64), b[keep].astype(np.uint64))
    exact_removed = {k for k, v in keeper.items() if k != v}
    lsh_removed = dedup_in_memory(texts, cfg, tmp_path)
    agree = len(exact_removed & lsh_removed) / max(1, len(exact_removed | lsh_removed))
    print(f"demo corpus: all-pairs removes {len(exact_removed)}, LSH removes {len(lsh_removed)}, agreement {agree:.4f}")
    assert len(exact_removed) >= 10 and agree >= 0.98


def test_signature_memory_does_not_grow_with_the_part(tmp_path):
    """Signatures, shingle sets and band records stream to disk: peak memory is one batch."""
    import tracemalloc

    from data_prep.document import Document
    from data_prep.minhash_dedup import signature_task

    rng = np.random.default_rng(0)
    vocab = np.array(["w%d" % i for i in range(5000)])

    def docs(n):
        for i in range(n):
            yield i, Document(id=str(i), text=" ".join(rng.choice(vocab, 1000)), source="s")

    peaks = []
    for n in (200, 800):  # about 1.3 MB and 5 MB of text
        tracemalloc.start()
        signature_task(docs(n), 0, 2, DedupConfig(), DedupPaths(tmp_path / str(n)), batch_bytes=256 << 10)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.3 * peaks[0], peaks


def _random_docs(n, seed=0, words=300):
    from data_prep.document import Document

    rng = np.random.default_rng(seed)
    vocab = np.array(["w%d" % i for i in range(5000)])
    return [(i << 32, Document(id=f"f:{i}", text=" ".join(rng.choice(vocab, words)), source="s")) for i in range(n)]


def test_band_records_go_to_the_bucket_of_their_key_in_input_order(tmp_path):
    from data_prep.minhash_dedup import BAND_DTYPE, band_keys, signature_task, signatures

    cfg = DedupConfig()
    docs = _random_docs(30)
    signature_task(iter(docs), 0, 7, cfg, DedupPaths(tmp_path), batch_bytes=8 << 10)  # several batches
    h, off, _ = shingle_hashes([d.text for _, d in docs], cfg)
    keys = band_keys(signatures(h, off, cfg), *cfg.band_layout())
    doc_keys = np.repeat(np.array([k for k, _ in docs], np.uint64), keys.shape[1])
    for b in range(7):
        rec = np.fromfile(DedupPaths(tmp_path).bands(b, 0), dtype=BAND_DTYPE)
        mask = keys.reshape(-1) % np.uint64(7) == b
        assert np.array_equal(rec["key"], keys.reshape(-1)[mask]) and np.array_equal(rec["doc"], doc_keys[mask])


def test_disabled_dedup_writes_only_the_document_table(tmp_path):
    from data_prep.minhash_dedup import signature_task

    paths = DedupPaths(tmp_path)
    res = signature_task(iter(_random_docs(5)), 0, 3, DedupConfig(enabled=False), paths)
    table = np.load(paths.docs(0))
    assert res["docs"] == 5 and len(table["norm_digest"]) == 5 and not table["contaminated"].any()
    assert not paths.sigs(0).exists() and not paths.shingles(0).exists() and not (tmp_path / "bands").exists()


def test_open_file_limit_is_raised_for_many_buckets_or_reported(tmp_path):
    """A signatures task keeps one file per bucket open: 1100 buckets under a soft limit of 1024."""
    import subprocess
    import sys

    code = f"""
import resource, sys
import numpy as np
from tests.data_prep.test_minhash_dedup import _random_docs
from data_prep.minhash_dedup import DedupConfig, DedupPaths, signature_task, ensure_open_files
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096))
signature_task(iter(_random_docs(3)), 0, 1100, DedupConfig(), DedupPaths(__import__('pathlib').Path({str(tmp_path)!r})))
assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 1164
resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))
try:
    ensure_open_files(2000)
except OSError as e:
    print("ERR", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR prep.num_tasks needs 2000 open files" in out.stdout and "ulimit -Hn) is 512" in out.stdout
    assert len(list((tmp_path / "bands").iterdir())) == 1100
