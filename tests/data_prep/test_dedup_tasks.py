"""Fuzzy dedup on disk: the task-parallel stages agree with the in-memory core for any task count,
stream what they write, and bound what a task holds."""
import json
import subprocess
import sys

import numpy as np

from data_prep import dedup_tasks
from data_prep.atomic import write_json
from data_prep.dedup_core import DedupConfig, band_keys, dedup_texts, shingle_hashes, signatures
from data_prep.dedup_tasks import (
    BAND_RECORD,
    find_components,
    merge_removed_records,
    record_removals,
    verify_bucket,
    write_signatures,
)
from data_prep.doc_table import DocTable, key_of
from data_prep.document import Document
from data_prep.layout import WorkDir
from tests.data_prep.test_dedup_core import planted_corpus

FILES = 6


def dedup_on_disk(texts: list[str], cfg: DedupConfig, work: WorkDir, num_tasks: int,
                  bucket_memory: int = 2 << 30, bucket_stats: list[dict] | None = None) -> set[int]:
    """Run signatures, buckets, components and removals as the pipeline does; return removed indices
    (and append each buckets task's report to ``bucket_stats``).

    Text ``i`` is line ``i`` of file ``i * FILES // len(texts)``: contiguous files, so key order is
    index order (as in :func:`dedup_texts`), and part ``p`` holds files ``p, p + n, ...``.
    """
    write_json(work.inputs, {"files": [f"f{k}" for k in range(FILES)]})
    file_of = [i * FILES // len(texts) for i in range(len(texts))]
    for part in range(num_tasks):
        docs = ((key_of(file_of[i], i), Document(id=f"f{file_of[i]}:{i}", text=t, source="s"))
                for i, t in enumerate(texts) if file_of[i] % num_tasks == part)
        write_signatures(docs, part, num_tasks, cfg, work, batch_bytes=64 << 10)
    for b in range(num_tasks):
        stats = verify_bucket(b, num_tasks, cfg, work, memory_bytes=bucket_memory)
        if bucket_stats is not None:
            bucket_stats.append(stats)
    # with a small bucket budget, also fold the buckets' edges after every bucket
    find_components(num_tasks, num_tasks, work, fold_at=1 if bucket_memory < (1 << 20) else 1 << 22)
    for part in range(num_tasks):
        record_removals(part, num_tasks, cfg, work)
    merge_removed_records(num_tasks, work, work.root / "removed.jsonl")
    removed: set[int] = set()
    for part in range(num_tasks):
        with np.load(work.removed(part)) as z:
            removed.update((z["key"] & np.uint64(0xFFFFFFFF)).astype(np.int64).tolist())
    return removed


def test_on_disk_stages_match_the_in_memory_core_for_any_task_count(tmp_path, monkeypatch):
    texts, truth, _ = planted_corpus(groups=45)
    cfg = DedupConfig()
    expected = dedup_texts(texts, cfg)
    assert len(expected & truth) >= 0.95 * len(truth)
    one = dedup_on_disk(texts, cfg, WorkDir(tmp_path / "one"), 1)
    three = dedup_on_disk(texts, cfg, WorkDir(tmp_path / "three"), 3)
    # A tiny memory budget (16 KiB: ~160 band records in memory; each bucket shard holds ~600) makes
    # every buckets task read its shard in several passes, each holding one sub-bucket of its records.
    reads: dict[int, list[tuple[int, int, int]]] = {}
    bucket_records = dedup_tasks._bucket_records

    def counted(work, bucket, num_parts, passes, j):
        rec = bucket_records(work, bucket, num_parts, passes, j)
        reads.setdefault(bucket, []).append((passes, j, len(rec)))
        return rec

    monkeypatch.setattr(dedup_tasks, "_bucket_records", counted)
    stats: list[dict] = []
    passes = dedup_on_disk(texts, cfg, WorkDir(tmp_path / "passes"), 3, bucket_memory=16 << 10, bucket_stats=stats)
    assert one == three == passes == expected
    work = WorkDir(tmp_path / "passes")
    for b, s in enumerate(stats):
        total = sum(work.bands(b, p).stat().st_size for p in range(3)) // BAND_RECORD.itemsize
        print(f"buckets task {b}: {total} band records in {s['passes']} passes of {[n for *_, n in reads[b]]}")
        assert s["passes"] >= 2, (b, total, s)
        assert [(p, j) for p, j, _ in reads[b]] == [(s["passes"], j) for j in range(s["passes"])]
        sizes = [n for *_, n in reads[b]]
        assert sum(sizes) == total and max(sizes) < total  # each record in one pass, no pass holds them all
    lines = (tmp_path / "one/removed.jsonl").read_text()
    assert lines == (tmp_path / "three/removed.jsonl").read_text() == (tmp_path / "passes/removed.jsonl").read_text()
    rows = [json.loads(line) for line in lines.splitlines()]
    assert [int(r["id"].split(":")[1]) for r in rows] == sorted(expected)  # input order
    for r in rows:  # the kept document is the earlier one of its group; the estimate is close to the truth
        assert int(r["kept_id"].split(":")[1]) == int(r["id"].split(":")[1]) - 1
        assert abs(r["jaccard_estimate"] - r["jaccard_exact"]) < 0.15 and r["jaccard_exact"] >= 0.8
    assert any(r["exact_duplicate"] for r in rows)
    # bounded memory: each bucket task loads only its shard of the band records
    work = WorkDir(tmp_path / "three")
    sizes = [sum(work.bands(b, p).stat().st_size for p in range(3)) for b in range(3)]
    assert max(sizes) < 0.5 * sum(sizes)
    # each bucket writes a spanning forest: at most one edge per removed document (a pair sharing
    # keys in several buckets appears in each)
    edges = [len(np.load(work.edges(b))) for b in range(3)]
    assert sum(edges) >= len(expected) and max(edges) <= len(expected)


def test_signature_memory_does_not_grow_with_the_part(tmp_path):
    """Signatures, shingle sets and band records stream to disk: peak memory is one batch plus the
    document table's few numbers per document."""
    import tracemalloc

    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i}" for i in range(5000)])

    def docs(n):
        for i in range(n):
            yield i, Document(id=f"f:{i}", text=" ".join(rng.choice(vocab, 1000)), source="s")

    peaks = []
    for n in (200, 800):  # about 1.3 MB and 5 MB of text
        tracemalloc.start()
        write_signatures(docs(n), 0, 2, DedupConfig(), WorkDir(tmp_path / str(n)), batch_bytes=256 << 10)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.3 * peaks[0], peaks


def _random_docs(n, seed=0, words=300):
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(5000)])
    return [(i << 32, Document(id=f"f:{i}", text=" ".join(rng.choice(vocab, words)), source="s")) for i in range(n)]


def test_band_records_go_to_the_bucket_of_their_key_in_input_order(tmp_path):
    cfg = DedupConfig()
    docs = _random_docs(30)
    work = WorkDir(tmp_path)
    write_signatures(iter(docs), 0, 7, cfg, work, batch_bytes=8 << 10)  # several batches
    h, off, _ = shingle_hashes([d.text for _, d in docs], cfg)
    keys = band_keys(signatures(h, off, cfg), *cfg.band_layout())
    doc_keys = np.repeat(np.array([k for k, _ in docs], np.uint64), keys.shape[1])
    rows = np.repeat(np.arange(len(docs)), keys.shape[1])
    for b in range(7):
        rec = np.fromfile(work.bands(b, 0), dtype=BAND_RECORD)
        mask = keys.reshape(-1) % np.uint64(7) == b
        assert np.array_equal(rec["key"], keys.reshape(-1)[mask]) and np.array_equal(rec["doc"], doc_keys[mask])
        assert np.array_equal(rec["row"], rows[mask])


def test_document_table_holds_numbers_only(tmp_path):
    """No strings per document: ids come back from keys, sources are indices (item: ~43 bytes/doc)."""
    work = WorkDir(tmp_path)
    docs = [(key_of(f, line), Document(id=f"file{f}.jsonl:{line}", text=f"text {f} {line} " * 20, source=src))
            for f, src in ((0, "B"), (2, "A")) for line in range(50)]
    write_signatures(iter(docs), 0, 1, DedupConfig(enabled=False), work)
    table = DocTable.load(work.docs(0))
    assert table.sources == ["A", "B"] and table.source.dtype == np.uint16
    assert all(getattr(table, c).dtype != object and getattr(table, c).dtype.kind != "U"
               for c in ("key", "digest", "norm_digest", "nbytes", "holdout_u", "contaminated"))
    per_doc = sum(getattr(table, c).itemsize for c in ("key", "digest", "norm_digest", "nbytes", "source",
                                                        "holdout_u", "contaminated"))
    assert per_doc <= 43
    assert table.source[:50].tolist() == [1] * 50 and table.source[50:].tolist() == [0] * 50


def test_disabled_dedup_writes_only_the_document_table(tmp_path):
    work = WorkDir(tmp_path)
    res = write_signatures(iter(_random_docs(5)), 0, 3, DedupConfig(enabled=False), work)
    table = DocTable.load(work.docs(0))
    assert res["docs"] == 5 and len(table.norm_digest) == 5 and not table.contaminated.any()
    assert not work.sigs(0).exists() and not work.shingles(0).exists() and not (tmp_path / "dedup/bands").exists()


def test_open_file_limit_is_raised_for_many_buckets_or_reported(tmp_path):
    """A signatures task keeps one file per bucket open: 1100 buckets under a soft limit of 1024."""
    code = f"""
import resource, pathlib
from tests.data_prep.test_dedup_tasks import _random_docs
from data_prep.dedup_core import DedupConfig
from data_prep.dedup_tasks import ensure_open_files, write_signatures
from data_prep.layout import WorkDir
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096))
write_signatures(iter(_random_docs(3)), 0, 1100, DedupConfig(), WorkDir(pathlib.Path({str(tmp_path)!r})))
assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 1164
resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))
try:
    ensure_open_files(2000)
except OSError as e:
    print("ERR", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR prep.run.num_tasks needs 2000 open files" in out.stdout and "ulimit -Hn) is 512" in out.stdout
    assert len(list((tmp_path / "dedup/bands").iterdir())) == 1100
