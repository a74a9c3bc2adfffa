"""Data-prep throughput per core: our fuzzy dedup, end to end, SentencePiece alone, and SlimPajama's recipe.

    python benchmarks/bench_prep.py [--corpus data/demo_corpus] [--tasks 2] [--datasketch-mb 4] \
        [--num-perm 128] [--bands B --rows R]

All figures come from one run on the same input (``--corpus``: a directory in the RedPajama layout;
the demo corpus is built there when missing). "Per core" is megabytes per CPU-second, counting every
process and thread involved (``getrusage`` of this process, plus the CPU time each pool task records
for itself), so it does not depend on how busy the machine is or how many workers ran.

Byte bases, named in every key: ``input`` is the UTF-8 text of every document read (before
normalization, filters and dedup); ``tokenized`` is what the end-to-end run encodes (the train and
holdout documents left after the filters and dedup, from its ``tokenize`` markers). SentencePiece
and the end-to-end run are compared over the same bytes, so ``e2e_over_spm`` is the ratio of their
CPU seconds for the same work and does not depend on the basis.

- ``dedup``: fuzzy dedup in memory in a fresh process (shingles, signatures, band keys, candidate
  pairs, exact Jaccard check of the 32-bit shingle sets, connected components; word 13-grams,
  ``--num-perm`` permutations, the default band layout or ``--bands``/``--rows``) on the clean
  documents, one thread; its peak RSS too. ``dedup_stages_in_e2e``: the dedup stages of the
  end-to-end run (signatures to removals, reading the clean parts and writing to disk included),
  from their task markers, over the same clean bytes.
- ``spm_encode``: SentencePiece encoding of the documents the end-to-end run tokenized, one thread
  per process, in as many processes as the end-to-end run has tasks (same contention), with the
  tokenizer the pipeline trains (training is not timed).
- ``e2e``: ``run_prep`` from raw files to shards with that tokenizer given as ``.model``
  (tokenizer training excluded), ``--tasks`` tasks on a local pool: every stage from ``clean``
  through ``shards``, with the same dedup settings. The ``report`` stage that follows (manifest,
  Markdown, PNG: mostly importing matplotlib, a constant) is reported on its own and in
  ``e2e_with_report_mb_s_per_core_over_input``.
- ``datasketch_slimpajama``: SlimPajama's recipe with datasketch (MinHash 128 permutations of
  character 13-grams of the normalized text, LSH with b=9, r=13, no Jaccard check) on the first
  ``--datasketch-mb`` MB of the clean documents (it runs at under 1 MB/s), over those bytes.

spm and e2e are timed ``--repeat`` times and the fastest run counts (other work on the machine only
ever slows a run down). Prints a table and, last, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before rensa is imported anywhere

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.dedup_core import DedupConfig, dedup_texts, jaccard_sorted, shingle_hashes  # noqa: E402

# Stages of the end-to-end run that make up fuzzy dedup.
DEDUP_STAGES = ("signatures", "buckets", "components", "removals")


def cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (user + system)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def markers(out: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(stage, file name, result) of every completion marker of a run (``<i>-of-<n>.json``)."""
    found = []
    for marker in sorted((out / "work" / "markers").glob("*/*.json")):
        found.append((marker.parent.name, marker.name, json.loads(marker.read_text())["result"]))
    return found


def pool_task_cpu(out: Path, tasks: int) -> float:
    """CPU seconds of the tasks that ran in pool workers, from their completion markers.

    The workers are children of multiprocessing's fork server, not of this process, so
    ``RUSAGE_CHILDREN`` does not see them; each task records its own CPU time instead. Tasks of
    single-task stages (markers ``*-of-00001``) run in this process and are already in its own CPU
    time.
    """
    if tasks == 1:
        return 0.0
    return sum(r["cpu_s"] for _, name, r in markers(out) if not name.endswith("-of-00001.json"))


def stage_cpu(out: Path, stages: tuple[str, ...]) -> float:
    """CPU seconds of every task of ``stages`` in a finished run."""
    return sum(r["cpu_s"] for stage, _, r in markers(out) if stage in stages)


def tokenized_bytes(out: Path) -> int:
    """Bytes the ``tokenize`` tasks encoded (their ``tokenize_<split>`` in-counts)."""
    total = 0
    for stage, _, r in markers(out):
        if stage == "tokenize":
            steps = r["stats"]["steps"]
            total += sum(st["total"].get("bytes_in", 0) for st in steps if st["step"].startswith("tokenize_"))
    return total


def load_docs(corpus: Path) -> list[tuple[str, str]]:
    """(id, text) of the corpus after normalization and the short-document filter (what dedup sees)."""
    from data_prep.filters import ShortDocumentFilter
    from data_prep.normalize import Normalize
    from data_prep.readers import DocumentReader, expand_inputs

    docs = DocumentReader(expand_inputs([str(corpus / "train")]), corpus).run()
    return [(d.id, d.text) for d in ShortDocumentFilter(200).run(Normalize().run(docs))]


def dedup_config(args: argparse.Namespace) -> Any:
    """DedupConfig with the layout of the command line (defaults otherwise)."""
    return DedupConfig(num_perm=args.num_perm, bands=args.bands, rows=args.rows)


def dedup_child(corpus: Path, args: argparse.Namespace) -> None:
    """Run in a fresh process: time our dedup (fastest of ``repeat``), print JSON (MB, CPU s, wall s, peak RSS MB)."""
    texts = [t for _, t in load_docs(corpus)]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    cfg = dedup_config(args)
    runs = []
    for _ in range(args.repeat):
        c0, w0 = cpu_seconds(), time.perf_counter()
        pairs: dict[str, int] = {}
        removed = dedup_texts(texts, cfg, pairs)
        runs.append((cpu_seconds() - c0, time.perf_counter() - w0))
    cpu, wall = min(runs)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mb": mb, "cpu_s": cpu, "wall_s": wall, "rss_mb": rss, "removed": len(removed),
                      "docs": len(texts), "num_perm": cfg.num_perm, **pairs}))


def datasketch_slimpajama(texts: list[str]) -> dict[str, float]:
    """SlimPajama's dedup recipe with datasketch; returns MB, CPU seconds and documents flagged."""
    from datasketch import MinHash, MinHashLSH

    table = str.maketrans("", "", string.punctuation)
    c0 = cpu_seconds()
    lsh = MinHashLSH(num_perm=128, params=(9, 13))
    flagged: dict[int, list[int]] = {}
    for i, t in enumerate(texts):
        s = re.sub(r"\s+", " ", t.lower().translate(table).strip())
        m = MinHash(num_perm=128)
        m.update_batch([s[j : j + 13].encode("utf-8") for j in range(max(1, len(s) - 12))])
        hits = lsh.query(m)
        if hits:
            flagged[i] = [int(h) for h in hits]
        lsh.insert(str(i), m)
    cpu = cpu_seconds() - c0
    # Not timed: how many flagged documents have no candidate at word-13-gram Jaccard >= 0.8.
    h, off, _ = shingle_hashes(texts, DedupConfig())
    sets = [np.unique(h[off[k] : off[k + 1]]) for k in range(len(texts))]
    false = sum(1 for i, cands in flagged.items() if max(jaccard_sorted(sets[i], sets[c]) for c in cands) < 0.8)
    return {"mb": sum(len(t.encode("utf-8")) for t in texts) / 1e6, "cpu_s": cpu, "flagged": len(flagged),
            "not_near_dup": false}


def _encode_share(model: str, texts: list[str]) -> float:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    c0 = time.process_time()
    for i in range(0, len(texts), 64):
        sp.encode(texts[i : i + 64], num_threads=1)
    return time.process_time() - c0


def spm_encode(texts: list[str], model: Path, procs: int) -> dict[str, float]:
    """SentencePiece encoding, one thread per process, ``procs`` processes each encoding a share:
    the same parallelism as the end-to-end run, so both per-core figures see the same contention."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    shares = [texts[i::procs] for i in range(procs)]
    if procs == 1:
        cpu = _encode_share(str(model), texts)
    else:
        with ProcessPoolExecutor(procs, mp_context=mp.get_context("forkserver")) as pool:  # no fork after threads
            cpu = sum(pool.map(_encode_share, [str(model)] * procs, shares))
    return {"mb": sum(len(t.encode("utf-8")) for t in texts) / 1e6, "cpu_s": cpu}


def prep_config(corpus: Path, out: Path, model: Path, tasks: int, dedup: Any) -> Any:
    """PrepConfig for the end-to-end run."""
    from data_prep.config import PrepConfig, RunConfig
    from data_prep.tokenizer import TokenizerConfig

    common = dict(inputs=[str(corpus / "train")], input_root=str(corpus), output_dir=str(out),
                  tokenizer=TokenizerConfig(model_path=str(model)), dedup=dedup)
    return PrepConfig(**common, run=RunConfig(num_tasks=tasks, workers=tasks))


def removed_ids(out: Path) -> set[str]:
    """Ids of the documents a finished run removed as near-duplicates (its ``removed.jsonl``)."""
    with open(out / "removed.jsonl", encoding="utf-8") as f:
        return {json.loads(line)["id"] for line in f if line.strip()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=str(REPO / "data/demo_corpus"))
    p.add_argument("--tasks", type=int, default=2, help="tasks (and local workers) of the end-to-end run")
    p.add_argument("--datasketch-mb", type=float, default=4.0)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--repeat", type=int, default=2, help="timed runs of spm and e2e; the fastest counts")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations of dedup (and of the e2e run)")
    p.add_argument("--bands", type=int, default=None, help="LSH bands (with --rows; default: DedupConfig's layout)")
    p.add_argument("--rows", type=int, default=None, help="LSH rows per band (with --bands)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--_dedup-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    corpus = Path(args.corpus)
    if args._dedup_child:
        dedup_child(corpus, args)
        return
    if (args.bands is None) != (args.rows is None):
        p.error("--bands and --rows go together")
    if not (corpus / "train").is_dir():
        from data_prep.demo_corpus import build_demo_corpus

        print(f"building the demo corpus in {corpus}", file=sys.stderr)
        build_demo_corpus(corpus)

    from data_prep.prep import run_prep
    from data_prep.readers import DocumentReader, expand_inputs
    from data_prep.tokenizer import TokenizerConfig, train_tokenizer

    dcfg = dedup_config(args)
    bands, rows = dcfg.band_layout()
    tmp = tempfile.TemporaryDirectory(dir=args.work)
    work = Path(tmp.name)
    disk_mb = sum(f.stat().st_size for f in expand_inputs([str(corpus / "train")])) / 1e6  # compressed, table only
    docs = load_docs(corpus)
    texts = [t for _, t in docs]

    # 1. our dedup, in a fresh process (peak RSS of dedup alone)
    layout = ["--num-perm", str(args.num_perm)]
    if args.bands is not None:
        layout += ["--bands", str(args.bands), "--rows", str(args.rows)]
    proc = subprocess.run([sys.executable, __file__, "--corpus", str(corpus), "--work", str(work / "dedup"),
                           "--repeat", str(args.repeat), *layout, "--_dedup-child"],
                          capture_output=True, text=True, check=True, env={**os.environ, "RAYON_NUM_THREADS": "1"})
    dd = json.loads(proc.stdout.strip().splitlines()[-1])

    # 2. tokenizer (not timed)
    tok_cfg = TokenizerConfig(vocab_size=args.vocab_size, max_sample_bytes=16_000_000)
    model = train_tokenizer(texts, tok_cfg, work / "tok.model")

    # 3. end to end with that tokenizer, and SentencePiece alone on what it tokenized
    input_bytes = sum(d.nbytes for d in DocumentReader(expand_inputs([str(corpus / "train")]), corpus).run())
    cfg = prep_config(corpus, work / "shards", model, args.tasks, dcfg)
    # e2e and spm alternate, so a busy spell on a shared machine hits both; the fastest of each counts.
    runs, encs = [], []
    kept: list[str] | None = None
    tok_bytes = 0
    for r in range(args.repeat):
        out = work / f"shards{r}"
        cfg.output_dir = str(out)
        c0, w0 = self_cpu_seconds(), time.perf_counter()
        manifest = run_prep(cfg)
        total = self_cpu_seconds() - c0 + pool_task_cpu(out, args.tasks)
        report_cpu = stage_cpu(out, ("report",))
        # read -> ... -> shards: the report stage (manifest, Markdown, PNG) comes after the shards.
        runs.append((total - report_cpu, time.perf_counter() - w0, report_cpu, stage_cpu(out, DEDUP_STAGES)))
        if kept is None:  # the same documents every run: those neither filtered nor removed as duplicates
            gone = removed_ids(out)
            kept = [t for i, t in docs if i not in gone]
            tok_bytes = tokenized_bytes(out)
        encs.append(spm_encode(kept, model, args.tasks))
    e2e_cpu, e2e_wall, report_cpu, dedup_stage_cpu = min(runs)
    enc = min(encs, key=lambda e: e["cpu_s"])
    kept_mb = enc["mb"]
    if abs(kept_mb * 1e6 - tok_bytes) > 0.005 * tok_bytes:
        print(f"warning: SentencePiece encoded {kept_mb:.2f} MB, the run tokenized {tok_bytes / 1e6:.2f} MB",
              file=sys.stderr)

    # 4. SlimPajama's recipe with datasketch on a prefix of the same documents
    subset, size = [], 0
    for t in texts:
        if size >= args.datasketch_mb * 1e6:
            break
        subset.append(t)
        size += len(t.encode("utf-8"))
    ds = datasketch_slimpajama(subset)

    input_mb, tok_mb = input_bytes / 1e6, tok_bytes / 1e6
    result = {
        "dedup_mb_s_per_core": round(dd["mb"] / dd["cpu_s"], 3),
        "dedup_stages_in_e2e_mb_s_per_core": round(dd["mb"] / dedup_stage_cpu, 3),
        "dedup_layout": f"{dd['bands']}x{dd['rows']}",
        "dedup_num_perm": dd["num_perm"],
        "e2e_mb_s_per_core_over_input": round(input_mb / e2e_cpu, 3),
        "spm_encode_mb_s_per_core_over_input": round(input_mb / enc["cpu_s"], 3),
        "e2e_mb_s_per_core_over_tokenized": round(tok_mb / e2e_cpu, 3),
        "spm_encode_mb_s_per_core_over_tokenized": round(tok_mb / enc["cpu_s"], 3),
        # Same bytes on both sides, so the basis cancels: SentencePiece CPU s / end-to-end CPU s.
        "e2e_over_spm": round(enc["cpu_s"] / e2e_cpu, 3),
        "e2e_over_spm_basis": "same bytes (input or tokenized): spm CPU s / e2e CPU s",
        "datasketch_slimpajama_mb_s_per_core": round(ds["mb"] / ds["cpu_s"], 3),
        "dedup_peak_rss_mb": round(dd["rss_mb"], 1),
        "input_mb": round(input_mb, 3),
        "tokenized_mb": round(tok_mb, 3),
        "dedup_input_mb": round(dd["mb"], 3),
        "dedup_removed_docs": dd["removed"],
        "dedup_candidate_pairs": dd["candidate_pairs"],
        "dedup_verified_pairs": dd["verified_pairs"],
        "spm_cpu_s": round(enc["cpu_s"], 3),
        "e2e_cpu_s": round(e2e_cpu, 3),
        "e2e_wall_s": round(e2e_wall, 2),
        "report_stage_cpu_s": round(report_cpu, 3),
        "e2e_with_report_mb_s_per_core_over_input": round(input_mb / (e2e_cpu + report_cpu), 3),
        "e2e_tasks": args.tasks,
        "e2e_tokens": manifest["totals"]["tokens"],
        "datasketch_input_mb": round(ds["mb"], 3),
        "datasketch_flagged_docs": ds["flagged"],
        "datasketch_flagged_not_near_dup_frac": round(ds["not_near_dup"] / ds["flagged"], 3) if ds["flagged"] else 0.0,
    }
    layout_name = f"word 13-grams, {dd['num_perm']} perms, {dd['bands']}x{dd['rows']}, exact check"
    rows_out = [  # (measurement, byte basis, MB, CPU s, MB/s per core)
        (f"fuzzy dedup in memory ({layout_name})", "clean docs", dd["mb"], dd["cpu_s"], result["dedup_mb_s_per_core"]),
        (f"fuzzy dedup stages inside e2e, {args.tasks} tasks (disk I/O incl.)", "clean docs", dd["mb"], dedup_stage_cpu,
         result["dedup_stages_in_e2e_mb_s_per_core"]),
        (f"SentencePiece encode of the tokenized docs, 1 thread x {args.tasks}", "tokenized", tok_mb, enc["cpu_s"],
         result["spm_encode_mb_s_per_core_over_tokenized"]),
        (f"end to end, {args.tasks} tasks (tokenizer given)", "tokenized", tok_mb, e2e_cpu,
         result["e2e_mb_s_per_core_over_tokenized"]),
        (f"SentencePiece encode of the tokenized docs, 1 thread x {args.tasks}", "input", input_mb, enc["cpu_s"],
         result["spm_encode_mb_s_per_core_over_input"]),
        (f"end to end, {args.tasks} tasks (tokenizer given)", "input", input_mb, e2e_cpu,
         result["e2e_mb_s_per_core_over_input"]),
        (f"SlimPajama recipe (datasketch, character 13-grams, first {ds['mb']:.1f} MB, b=9 r=13)", "that prefix",
         ds["mb"], ds["cpu_s"], result["datasketch_slimpajama_mb_s_per_core"]),
    ]
    print(f"corpus {corpus}: {input_mb:.1f} MB of text read ({disk_mb:.1f} MB on disk), {len(texts)} documents "
          f"({dd['mb']:.1f} MB) after the short filter, {tok_mb:.1f} MB tokenized after dedup")
    print(f"{'measurement':76s} {'bytes':>11s} {'MB':>7s} {'CPU s':>7s} {'MB/s/core':>9s}")
    for name, basis, mb, cpu, rate in rows_out:
        print(f"{name:76s} {basis:>11s} {mb:7.2f} {cpu:7.2f} {rate:9.2f}")
    print(f"e2e/spm over the same bytes = spm CPU s / e2e CPU s = {enc['cpu_s']:.2f} / {e2e_cpu:.2f} = "
          f"{result['e2e_over_spm']:.2f} (target >= 0.7)")
    print(f"dedup: {dd['candidate_pairs']} candidate pairs, {dd['verified_pairs']} verified, {dd['removed']} removed; "
          f"peak RSS {dd['rss_mb']:.0f} MB; e2e wall {e2e_wall:.1f} s; report stage {report_cpu:.2f} CPU s "
          f"(with it: {result['e2e_with_report_mb_s_per_core_over_input']:.2f} MB/s/core over input)")
    print(json.dumps(result))
    tmp.cleanup()


if __name__ == "__main__":
    main()
