"""The prep stages. Each is ``fn(ctx, task_index) -> result`` and runs as one task of a stage.

Parallel stages (``num_tasks`` tasks): clean, signatures, buckets, clusters, tokenize, shards.
Single-task stages (metadata only, or inherently global): split, tokenizer, plan, report.

Work directory (``<output_dir>/work``)::

    clean/part-<i>.jsonl.zst   documents of input files i, i+n, ... after normalize + filters
    dedup/                     signatures, band buckets, edges, removed rows (minhash_dedup.py)
    split/<i>.npy              per clean row: 0 train, 1 val, <0 dropped (dedup / decontam)
    tokens/<i>.bin, <i>.npz    token ids of the kept rows of part i
    plan/<split>.npz, .json    the token stream of a split (documents in order, with repeats)
    shard_entries/*.json       one manifest entry per written shard
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard
from tqdm import tqdm

from data_prep.config import PrepConfig, config_hash
from data_prep.document import Document, hash_fraction
from data_prep.filters import QualityFilter, ShortDocumentFilter
from data_prep.minhash_dedup import (
    DedupPaths,
    bucket_task,
    cluster_task,
    iter_with_keys,
    load_removed,
    merge_removed,
    save_npy,
    save_npz,
    signature_task,
)
from data_prep.mixture import copies, realized, source_factors
from data_prep.normalize import Normalize
from data_prep.readers import DocumentReader, expand_inputs, skip_reason
from data_prep.shard_format import ShardWriter, shard_name, token_dtype
from data_prep.stats import PrepStats

STAGES = ("clean", "signatures", "buckets", "clusters", "split", "tokenizer", "tokenize", "plan", "shards", "report")
SINGLE_TASK = {"split", "tokenizer", "plan", "report"}
SPLITS = ("train", "val")
# split codes per clean row
TRAIN, VAL, DUP, DECONTAM_HASH, DECONTAM_NGRAM = 0, 1, -1, -2, -3


def progress(iterable, desc: str, unit: str = "doc"):
    """A tqdm bar on stderr (one per task; SLURM logs keep the last refresh)."""
    return tqdm(iterable, desc=desc, unit=unit, mininterval=2.0, dynamic_ncols=True, file=sys.stderr, leave=False)


def stage_hashes(cfg: PrepConfig) -> dict[str, str]:
    """Config hash of each stage, chained: a change re-runs its stage and everything after it."""
    f = cfg.to_dict()
    h: dict[str, str] = {}
    h["clean"] = config_hash([f[k] for k in ("inputs", "input_root", "text_key", "source_key", "normalize_form", "ftfy",
                                              "min_doc_chars", "quality", "num_tasks")])
    h["signatures"] = config_hash([h["clean"], f["dedup"], f["eval_files"], f["decontam_ngram"], f["decontam_min_words"]])
    h["buckets"] = config_hash([h["signatures"]])
    h["clusters"] = config_hash([h["buckets"]])
    h["split"] = config_hash([h["clusters"], f["holdout_ratio"], f["holdout_count"]])
    h["tokenizer"] = config_hash([h["split"], f["tokenizer"], f["mixture"], cfg.seed])
    h["tokenize"] = config_hash([h["tokenizer"], f["long_doc_chars"]])
    h["plan"] = config_hash([h["tokenize"], f["mixture"], cfg.seq_len, cfg.samples_per_shard, cfg.shard_divisor])
    h["shards"] = config_hash([h["plan"]])
    h["report"] = h["shards"]
    return h


@dataclass
class Context:
    """What every task needs: the config and the paths."""

    cfg: PrepConfig

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def work(self) -> Path:
        return self.out / "work"

    @property
    def n(self) -> int:
        return self.cfg.num_tasks

    @property
    def dedup(self) -> DedupPaths:
        return DedupPaths(self.work / "dedup")

    def clean_part(self, i: int) -> Path:
        return self.work / "clean" / f"part-{i:05d}.jsonl.zst"

    def split_codes(self, i: int) -> Path:
        return self.work / "split" / f"{i:05d}.npy"

    def tokens(self, i: int) -> tuple[Path, Path]:
        return self.work / "tokens" / f"{i:05d}.bin", self.work / "tokens" / f"{i:05d}.npz"

    def input_files(self, skipped: list[Path] | None = None) -> tuple[list[Path], Path]:
        """Sorted input files and their root; files no reader handles go to ``skipped``."""
        root = Path(self.cfg.input_root) if self.cfg.input_root else Path.cwd()
        other: list[Path] = []
        files = expand_inputs(self.cfg.inputs, root=root if self.cfg.input_root else None, skipped=other)
        if not files:
            raise FileNotFoundError(f"prep.inputs={self.cfg.inputs}: no jsonl/json/parquet/txt files found (plain, .zst, "
                                    f".gz or .bz2); skipped: {[str(p) for p in other[:20]]}")
        if skipped is not None:
            skipped.extend(other)
        return files, root


def read_clean(path: Path) -> Iterator[tuple[int, Document]]:
    """(order key, document) of a clean part, in order."""
    with open(path, "rb") as raw:
        for line in io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), 1 << 20):
            rec = json.loads(line)
            yield rec["k"], Document(id=rec["id"], text=rec["text"], source=rec["source"])


# ---------------------------------------------------------------------------------------------- clean


def clean(ctx: Context, i: int) -> dict[str, Any]:
    """Read input files i, i+n, ...; normalize; filter; write clean part i."""
    cfg = ctx.cfg
    skipped: list[Path] = []
    files, root = ctx.input_files(skipped)
    file_index = {os.path.relpath(p, root): k for k, p in enumerate(files)}
    stats = PrepStats()
    if i == 0:  # files no reader handles: listed once, in the report's errors and skipped_files
        for p in skipped:
            stats.error(os.path.relpath(p, root), None, skip_reason(p))
            stats.drop(DocumentReader.name, "unsupported_file")
    mine = files[i :: ctx.n]
    docs = DocumentReader(mine, root, cfg.text_key, cfg.source_key, stats=stats).run()
    docs = Normalize(cfg.normalize_form, stats=stats, ftfy=cfg.ftfy).run(docs)
    docs = ShortDocumentFilter(cfg.min_doc_chars, stats=stats).run(docs)
    if cfg.quality.enabled:
        docs = QualityFilter(cfg.quality, stats=stats).run(docs)
    out = ctx.clean_part(i)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=1).stream_writer(raw) as w:
        for key, d in progress(iter_with_keys(docs, file_index), f"clean {i}/{ctx.n}"):
            w.write((json.dumps({"k": key, "id": d.id, "source": d.source, "text": d.text}, ensure_ascii=False) + "\n").encode())
            n += 1
    os.replace(tmp, out)
    return {"stats": stats.to_dict(), "docs": n, "files": len(mine), "total_files": len(files)}


# ---------------------------------------------------------------------------------------------- dedup


def signatures(ctx: Context, i: int) -> dict[str, Any]:
    """MinHash signatures of clean part i; band records spilled into n bucket shards."""
    cfg = ctx.cfg
    ngrams = None
    if cfg.eval_files:
        from data_prep.decontam import eval_ngrams, eval_texts

        ngrams = eval_ngrams(eval_texts(cfg.eval_files, cfg.text_key), cfg.decontam_ngram, cfg.decontam_min_words)
    docs = progress(read_clean(ctx.clean_part(i)), f"signatures {i}/{ctx.n}")
    res = signature_task(docs, i, ctx.n, cfg.dedup, ctx.dedup, eval_ngrams=ngrams)
    if ngrams is not None:
        res["eval_examples"] = ngrams.examples
        res["eval_examples_too_short"] = ngrams.too_short
    return res


def buckets(ctx: Context, i: int) -> dict[str, Any]:
    if not ctx.cfg.dedup.enabled:
        from data_prep.minhash_dedup import EDGE_DTYPE

        save_npy(ctx.dedup.edges(i), np.zeros(0, EDGE_DTYPE))
        return {"candidate_pairs": 0, "verified_pairs": 0}
    return bucket_task(i, ctx.n, ctx.cfg.dedup, ctx.dedup)


def clusters(ctx: Context, i: int) -> dict[str, Any]:
    return cluster_task(i, ctx.n, ctx.n, ctx.n, ctx.dedup)


# ---------------------------------------------------------------------------------------------- split


def split(ctx: Context, i: int) -> dict[str, Any]:
    """Holdout (ratio or count, by a hash of the document id), hash and n-gram decontamination."""
    cfg = ctx.cfg
    merge_removed(ctx.dedup, ctx.n, ctx.out / "removed.jsonl")
    tables = [dict(np.load(ctx.dedup.docs(p))) for p in range(ctx.n)]
    removed = [load_removed(ctx.dedup, p) for p in range(ctx.n)]
    codes = [np.zeros(len(t["key"]), np.int8) for t in tables]
    u = [np.fromiter((hash_fraction(x) for x in t["id"]), float, len(t["id"])) for t in tables]
    for p, rem in enumerate(removed):
        if rem:
            codes[p][list(rem)] = DUP
    if cfg.holdout_count is not None:
        alive_u = np.concatenate([u[p][codes[p] == TRAIN] for p in range(ctx.n)])
        k = min(cfg.holdout_count, len(alive_u))
        cut = np.sort(alive_u)[k - 1] if k > 0 else -1.0
        for p in range(ctx.n):
            codes[p][(codes[p] == TRAIN) & (u[p] <= cut)] = VAL
    else:
        for p in range(ctx.n):
            codes[p][(codes[p] == TRAIN) & (u[p] < cfg.holdout_ratio)] = VAL
    # A training document whose normalized text hashes like a holdout document's is removed.
    val_digests = np.concatenate([t["norm_digest"][c == VAL] for t, c in zip(tables, codes)])
    for t, c in zip(tables, codes):
        c[(c == TRAIN) & np.isin(t["norm_digest"], val_digests)] = DECONTAM_HASH
        c[(c >= 0) & t["contaminated"]] = DECONTAM_NGRAM
    for p in range(ctx.n):
        save_npy(ctx.split_codes(p), codes[p])

    stats = PrepStats()
    train_bytes: dict[str, int] = {}
    for t, c, rem in zip(tables, codes, removed):
        _split_stats(stats, t, c, rem)
        names, inv = np.unique(t["source"], return_inverse=True)
        per_src = np.bincount(inv[c == TRAIN], weights=t["nbytes"][c == TRAIN], minlength=len(names))
        for k in np.nonzero(per_src)[0]:
            train_bytes[str(names[k])] = train_bytes.get(str(names[k]), 0) + int(per_src[k])
    return {"stats": stats.to_dict(), "train_bytes": dict(sorted(train_bytes.items()))}


def _split_stats(stats: PrepStats, table: dict[str, np.ndarray], codes: np.ndarray, removed: dict[int, bool]) -> None:
    """Per-source documents and bytes in/out of exact dedup, fuzzy dedup, decontamination, split
    and holdout for one part, from its split codes (array sums per source, not a loop per document)."""
    if not len(codes):
        return
    names, inv = np.unique(table["source"], return_inverse=True)
    nbytes = table["nbytes"]

    def add(step: str, key: str, mask: np.ndarray) -> None:
        docs = np.bincount(inv[mask], minlength=len(names))
        size = np.bincount(inv[mask], weights=nbytes[mask], minlength=len(names))
        for k in np.nonzero(docs)[0]:
            stats.add(step, str(names[k]), key, int(docs[k]), int(size[k]))

    exact = np.zeros(len(codes), bool)
    exact[[r for r, same in removed.items() if same]] = True
    near = (codes == DUP) & ~exact
    after_dedup = codes != DUP
    kept = codes >= 0
    for step, into, out, drops in (
        ("exact_dedup", np.ones(len(codes), bool), ~exact, {"exact_duplicate": exact}),
        ("fuzzy_dedup", ~exact, after_dedup, {"near_duplicate": near}),
        ("decontam", after_dedup, kept, {"holdout_hash_match": codes == DECONTAM_HASH, "eval_ngram_match": codes == DECONTAM_NGRAM}),
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


def _kept_docs(ctx: Context, i: int, wanted: tuple[int, ...]) -> Iterator[tuple[int, int, Document]]:
    """(row, code, document) of clean part i whose split code is in ``wanted``."""
    codes = np.load(ctx.split_codes(i))
    for row, (key, doc) in enumerate(read_clean(ctx.clean_part(i))):
        if codes[row] in wanted:
            yield row, int(codes[row]), doc


# ---------------------------------------------------------------------------------------------- tokenizer


def tokenizer(ctx: Context, i: int) -> dict[str, Any]:
    """Train SentencePiece on a weighted reservoir sample of the train split (or copy a .model)."""
    from data_prep.tokenizer import WeightedReservoir, obtain_tokenizer, sample_cap, tokenizer_info, trainer_memory_mb

    cfg = ctx.cfg
    out = ctx.out / "tokenizer.model"
    info: dict[str, Any] = {}
    if cfg.tokenizer.model_path is None:
        split_res = _marker_result(ctx, "split", 0)
        # Mixture weights from bytes (tokens are not known before the tokenizer exists). Only the
        # relative weights matter for the sample, so the total (in tokens) is left out here.
        relative = dataclasses.replace(cfg.mixture, total_tokens=None)
        factors = source_factors(relative, split_res["train_bytes"], "bytes") if split_res["train_bytes"] else {}
        cap = sample_cap(cfg.tokenizer)
        info["sample_cap_bytes"] = cap
        info["estimated_trainer_memory_mb"] = trainer_memory_mb(min(cap, sum(split_res["train_bytes"].values())))
        print(f"tokenizer: sampling up to {cap / 1e6:.1f} MB with weights {factors}; trainer memory estimate "
              f"{info['estimated_trainer_memory_mb']} MB", file=sys.stderr)
        res = WeightedReservoir(cap)
        for p in range(ctx.n):
            codes = np.load(ctx.split_codes(p))
            for row, (key, d) in enumerate(progress(read_clean(ctx.clean_part(p)), f"tokenizer sample {p}/{ctx.n}")):
                if codes[row] == TRAIN:
                    res.offer(hash_fraction("tok:" + d.id), factors.get(d.source, 1.0), key, d.text)
        info["sample_bytes"] = res.bytes
        sample = res.texts()
    else:
        sample = []
    obtain_tokenizer(cfg.tokenizer, sample, out, cfg.seed)
    return {**tokenizer_info(out), "training": info}


# ---------------------------------------------------------------------------------------------- tokenize


def tokenize(ctx: Context, i: int) -> dict[str, Any]:
    """Encode the kept documents of part i (one process per task; long documents piecewise)."""
    import sentencepiece as spm

    from data_prep.pack import encode_texts

    tok = _marker_result(ctx, "tokenizer", 0)
    sp = spm.SentencePieceProcessor(model_file=str(ctx.out / tok["file"]))
    dtype = token_dtype(tok["vocab_size"])
    bin_path, idx_path = ctx.tokens(i)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = bin_path.with_name(bin_path.name + ".tmp")
    rows: list[int] = []
    counts: list[int] = []
    stats = PrepStats()
    batch: list[tuple[int, int, Document]] = []

    def flush(fh) -> None:
        ids = encode_texts(sp, [d.text for _, _, d in batch], ctx.cfg.long_doc_chars)
        for (row, code, d), t in zip(batch, ids):
            fh.write(np.asarray(t, dtype=dtype).tobytes())
            rows.append(row)
            counts.append(len(t))
            step = f"tokenize_{SPLITS[code]}"
            stats.add(step, d.source, "in", 1, d.nbytes)
            stats.add(step, d.source, "out", 1, d.nbytes)
        batch.clear()

    with open(tmp, "wb") as fh:
        for item in progress(_kept_docs(ctx, i, (TRAIN, VAL)), f"tokenize {i}/{ctx.n}"):
            batch.append(item)
            if len(batch) >= 64:
                flush(fh)
        if batch:
            flush(fh)
    os.replace(tmp, bin_path)
    save_npz(idx_path, row=np.array(rows, np.int64), count=np.array(counts, np.int64))
    return {"stats": stats.to_dict(), "docs": len(rows), "tokens": int(sum(counts))}


# ---------------------------------------------------------------------------------------------- shards


@dataclass
class SplitPlan:
    """The token stream of one split: documents (as part/offset/count/source) in order, with repeats."""

    part: np.ndarray
    offset: np.ndarray
    count: np.ndarray
    source: np.ndarray  # index into ``sources``
    sources: list[str]
    blocks: int  # blocks written
    shards: int
    factors: dict[str, float]
    tokens_available: dict[str, int]


def plan_split(ctx: Context, split_code: int) -> SplitPlan:
    """Deterministic stream of a split: documents in input order, pass after pass for repeats."""
    cfg = ctx.cfg
    keys, parts, offs, cnts, srcs, ids = [], [], [], [], [], []
    for p in range(ctx.n):
        table = np.load(ctx.dedup.docs(p))
        codes = np.load(ctx.split_codes(p))
        z = np.load(ctx.tokens(p)[1])
        row, count = z["row"], z["count"]
        offset = np.concatenate(([0], np.cumsum(count)[:-1])).astype(np.int64)
        sel = codes[row] == split_code
        keys.append(table["key"][row][sel])
        parts.append(np.full(int(sel.sum()), p, np.int64))
        offs.append(offset[sel])
        cnts.append(count[sel])
        srcs.append(table["source"][row][sel])
        ids.append(table["id"][row][sel])
    key = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    order = np.argsort(key, kind="stable")
    part, offset, count = (np.concatenate(x)[order] for x in (parts, offs, cnts))
    source_names = np.concatenate(srcs)[order]
    doc_ids = np.concatenate(ids)[order]
    sources = sorted(set(source_names.tolist()))
    src = np.searchsorted(np.array(sources), source_names) if len(sources) else np.zeros(0, np.int64)
    available = {s: int(count[src == k].sum() + (src == k).sum()) for k, s in enumerate(sources)}
    if split_code == TRAIN and available:
        factors = source_factors(cfg.mixture, available)
    else:
        factors = {s: 1.0 for s in sources}
    n_copies = np.zeros(len(count), np.int64)
    for k, s in enumerate(sources):
        sel = np.nonzero(src == k)[0]
        n_copies[sel] = copies(doc_ids[sel].tolist(), factors[s], cfg.mixture.seed, count[sel] + 1)
    passes = [np.nonzero(n_copies > p)[0] for p in range(int(n_copies.max()) if len(n_copies) else 0)]
    idx = np.concatenate(passes) if passes else np.zeros(0, np.int64)
    part, offset, count, src = part[idx], offset[idx], count[idx], src[idx]
    B = cfg.block_size
    total_blocks = int((count + 1).sum()) // B
    sps = cfg.samples_per_shard
    if split_code == TRAIN and cfg.shard_divisor > 1:
        full = total_blocks // sps
        shards = full - full % cfg.shard_divisor
        if shards == 0:
            raise ValueError(f"{total_blocks} train blocks make {full} full shards of samples_per_shard={sps}, fewer than "
                             f"shard_divisor={cfg.shard_divisor}: lower samples_per_shard")
        blocks = shards * sps
    else:
        shards = -(-total_blocks // sps)
        blocks = total_blocks
    return SplitPlan(part, offset, count, src, sources, blocks, shards, factors, available)


_PLAN_ARRAYS = {"part": np.int32, "offset": np.int64, "count": np.int32, "source": np.int32}


def plan(ctx: Context, i: int) -> dict[str, Any]:
    """Plan the token stream of each split once (every shards task and the report load it)."""
    from data_prep.tasks import write_json_atomic

    out: dict[str, Any] = {}
    for code, name in enumerate(SPLITS):
        p = plan_split(ctx, code)
        npz, meta = ctx.work / "plan" / f"{name}.npz", ctx.work / "plan" / f"{name}.json"
        save_npz(npz, **{k: getattr(p, k).astype(t) for k, t in _PLAN_ARRAYS.items()})
        summary = {"sources": p.sources, "blocks": p.blocks, "shards": p.shards, "factors": p.factors,
                   "tokens_available": p.tokens_available}
        write_json_atomic(meta, summary)
        out[name] = {k: summary[k] for k in ("blocks", "shards")}
    return out


def load_plan(ctx: Context, split_code: int) -> SplitPlan:
    """The plan the ``plan`` stage wrote for a split."""
    name = SPLITS[split_code]
    _marker_result(ctx, "plan", 0)  # fails clearly if the plan stage has not run with this config
    z = np.load(ctx.work / "plan" / f"{name}.npz")
    meta = json.loads((ctx.work / "plan" / f"{name}.json").read_text())
    return SplitPlan(**{k: z[k].astype(np.int64) for k in _PLAN_ARRAYS}, **meta)


def _shard_tokens(ctx: Context, plan: SplitPlan, cum: np.ndarray, start: int, stop: int, dtype: np.dtype,
                  eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [start, stop) of the stream and the source index of each; ``cum`` holds the stream
    offset of every document (its tokens plus EOS)."""
    first = int(np.searchsorted(cum, start, side="right")) - 1
    toks, srcs = [], []
    mm: dict[int, np.memmap] = {}
    pos = int(cum[first])
    d = first
    while pos < stop:
        p = int(plan.part[d])
        if p not in mm:
            mm[p] = np.memmap(ctx.tokens(p)[0], dtype=dtype, mode="r") if os.path.getsize(ctx.tokens(p)[0]) else np.zeros(0, dtype)
        t = np.empty(int(plan.count[d]) + 1, dtype)
        t[:-1] = mm[p][plan.offset[d] : plan.offset[d] + plan.count[d]]
        t[-1] = eos
        toks.append(t)
        srcs.append(np.full(len(t), plan.source[d], np.int32))
        pos += len(t)
        d += 1
    tok = np.concatenate(toks)
    src = np.concatenate(srcs)
    lo = start - int(cum[first])
    return tok[lo : lo + stop - start], src[lo : lo + stop - start]


def shards(ctx: Context, i: int) -> dict[str, Any]:
    """Write shards i, i+n, ... of each split (every task derives the same plan)."""
    cfg = ctx.cfg
    tok = _marker_result(ctx, "tokenizer", 0)
    dtype = token_dtype(tok["vocab_size"])
    B, sps = cfg.block_size, cfg.samples_per_shard
    entries_dir = ctx.work / "shard_entries"
    entries_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for code, split_name in enumerate(SPLITS):
        plan = load_plan(ctx, code)
        cum = np.concatenate(([0], np.cumsum(plan.count + 1)))
        for s in range(i, plan.shards, ctx.n):
            start, stop = s * sps, min((s + 1) * sps, plan.blocks)
            toks, srcs = _shard_tokens(ctx, plan, cum, start * B, stop * B, dtype, tok["eos_id"])
            writer = ShardWriter(ctx.out / shard_name(split_name, s), s, dtype)
            for b in range(stop - start):
                sl = slice(b * B, (b + 1) * B)
                c = np.bincount(srcs[sl], minlength=len(plan.sources))
                writer.add(toks[sl], {plan.sources[k]: int(v) for k, v in enumerate(c) if v})
            entry = writer.close(B)
            entry["proportions"] = realized(entry["tokens_per_source"])
            tmp = entries_dir / f"{split_name}-{s:06d}.json.tmp"
            tmp.write_text(json.dumps(entry))
            os.replace(tmp, entries_dir / f"{split_name}-{s:06d}.json")
            written += 1
    return {"shards_written": written}


def _marker_result(ctx: Context, stage: str, index: int) -> dict[str, Any]:
    from data_prep.tasks import Marker

    n = 1 if stage in SINGLE_TASK else ctx.n
    res = Marker(ctx.work, stage, index, n, stage_hashes(ctx.cfg)[stage]).result()
    if res is None:
        raise RuntimeError(f"stage {stage!r} task {index} of {n} has not finished (no matching marker under {ctx.work}/markers)")
    return res


# ---------------------------------------------------------------------------------------------- report


def report(ctx: Context, i: int) -> dict[str, Any]:
    """manifest.json (written last), prep_report.{json,md,png}, prep_stats.json."""
    from data_prep.report import write_report
    from data_prep.shard_format import FORMAT_VERSION, MANIFEST, RecordLayout
    from data_prep.tasks import stage_results, write_json_atomic

    cfg = ctx.cfg
    h = stage_hashes(cfg)
    res = {s: stage_results(ctx.work, s, 1 if s in SINGLE_TASK else ctx.n, h[s]) for s in STAGES if s != "report"}
    tok = res["tokenizer"][0]
    dtype = token_dtype(tok["vocab_size"])
    splits: dict[str, Any] = {}
    for code, name in enumerate(SPLITS):
        plan = load_plan(ctx, code)
        entries = [json.loads((ctx.work / "shard_entries" / f"{name}-{s:06d}.json").read_text()) for s in range(plan.shards)]
        per_source: dict[str, int] = {}
        for e in entries:
            for k, v in e["tokens_per_source"].items():
                per_source[k] = per_source.get(k, 0) + v
        total_stream = int((plan.count + 1).sum())
        splits[name] = {
            "shards": entries,
            "samples": sum(e["samples"] for e in entries),
            "tokens": sum(e["tokens"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
            "tokens_per_source": dict(sorted(per_source.items())),
            "proportions": realized(per_source),
            "tail_tokens_dropped": total_stream - plan.blocks * cfg.block_size,
            "mixture_factors": {k: round(v, 6) for k, v in sorted(plan.factors.items())},
            "tokens_available": plan.tokens_available,
        }
        # Shards of an earlier run with more shards than this one are not part of the dataset.
        for stale in ctx.out.glob(f"{name}-*.tar"):
            if int(stale.stem.split("-")[1]) >= plan.shards:
                stale.unlink()
    tok_info = {k: v for k, v in tok.items() if k not in ("training", "cpu_s", "wall_s")}
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok_info,
        "seq_len": cfg.seq_len,
        "block_size": cfg.block_size,
        "dtype": dtype.name,
        "record": RecordLayout.for_block(cfg.block_size, dtype).__dict__,
        "splits": splits,
        "totals": {k: sum(s[k] for s in splits.values()) for k in ("samples", "tokens", "bytes")},
        "prep_config": {k: v for k, v in cfg.to_dict().items() if k not in ("stage", "task_index", "workers", "force")},
        "prep_config_hash": h["shards"],
    }
    stats = PrepStats()
    for stage in ("clean", "split", "tokenize"):
        for r in res[stage]:
            stats.merge(PrepStats.from_dict(r["stats"]))
    dedup = {
        "bands_rows": [res["signatures"][0]["bands"], res["signatures"][0]["rows"]] if res["signatures"] else None,
        "candidate_pairs": sum(r["candidate_pairs"] for r in res["buckets"]),
        "verified_pairs": sum(r["verified_pairs"] for r in res["buckets"]),
        "removed": sum(r["removed"] for r in res["clusters"]),
        "clusters": res["clusters"][0]["clusters"],
        "edges": res["clusters"][0]["edges"],
    }
    stage_time = {s: {"cpu_s": round(sum(r.get("cpu_s", 0) for r in rs), 3), "wall_s": round(sum(r.get("wall_s", 0) for r in rs), 3),
                      "tasks": len(rs)} for s, rs in res.items()}
    sig0 = res["signatures"][0] if res["signatures"] else {}
    decontam = ({"eval_examples": sig0["eval_examples"], "eval_examples_too_short": sig0["eval_examples_too_short"],
                 "ngram": cfg.decontam_ngram, "min_words": cfg.decontam_min_words} if "eval_examples" in sig0 else None)
    write_report(ctx.out, stats, manifest, dedup, tok.get("training", {}), stage_time, decontam)
    write_json_atomic(ctx.out / MANIFEST, manifest)  # last: its presence means the dataset is complete
    return {"manifest": MANIFEST}


STAGE_FUNCS = {
    "clean": clean,
    "signatures": signatures,
    "buckets": buckets,
    "clusters": clusters,
    "split": split,
    "tokenizer": tokenizer,
    "tokenize": tokenize,
    "plan": plan,
    "shards": shards,
    "report": report,
}


def clear_outputs(out: Path) -> None:
    """Remove the work directory (``force=true``)."""
    shutil.rmtree(out / "work", ignore_errors=True)
