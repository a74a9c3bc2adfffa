"""The prep stages, declared once in :data:`STAGES`: each is ``run(ctx, task_index) -> result``.

A parallel stage runs as ``run.num_tasks`` tasks (a SLURM array), a single-task stage as one. Every
task reads what earlier stages wrote under the work directory (:mod:`data_prep.layout`) and writes
its own outputs atomically; the algorithms live in their own modules (dedup_tasks, holdout, plan,
manifest), so this file is the pipeline and nothing else.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from data_prep import storage
from data_prep.atomic import atomic_path, save_npz, write_json
from data_prep.config import PrepConfig, config_hash
from data_prep.doc_table import key_of
from data_prep.document import Document
from data_prep.holdout import SPLITS, TRAIN, VAL, assign_splits
from data_prep.layout import WorkDir
from data_prep.progress import Heartbeat, Progress, progress
from data_prep.stats import PrepStats


@dataclass(frozen=True)
class InputState:
    """The input files as clean task ``i`` sees them now: the sorted list (document keys index into
    it, and it decides which task reads which file) and a fingerprint of each file the task reads."""

    files: list[Path]
    root: Path
    rel: list[str]  # files relative to root
    skipped: list[Path]  # files no reader handles
    mode: str  # run.input_fingerprint
    list_digest: str
    mine: dict[str, list[int | str]]  # relative name -> [size, mtime_ns] or [size, sha256]

    @property
    def digest(self) -> str:
        return config_hash([self.mode, self.list_digest, self.mine])


def input_fingerprint(path: Path, mode: str) -> list[int | str]:
    """``[size, mtime_ns]`` (one stat), or with ``mode="content"`` ``[size, sha256]`` (reads the file).

    A file that cannot be read (a dangling link) gets ``[-1, <error>]``: the reader reports it, and
    the run goes on."""
    try:
        if not isinstance(path, Path):  # an object in a store (UPath)
            return storage.fingerprint(path, mode)
        st = path.stat()
        if mode != "content":
            return [st.st_size, st.st_mtime_ns]
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        return [st.st_size, h.hexdigest()]
    except OSError as e:
        return [-1, f"{type(e).__name__}: {e.strerror}"]


@dataclass
class Context:
    """What every task needs: the config and the paths."""

    cfg: PrepConfig
    _inputs: dict[int, InputState] = field(default_factory=dict, repr=False, compare=False)

    @property
    def out(self) -> Path:
        """Where outputs are written (``output_dir``, or ``run.local_dir`` before upload to a URL)."""
        return self.cfg.local_out()

    @property
    def remote_out(self) -> str | None:
        """``output_dir`` when it is a URL the outputs are uploaded to."""
        return self.cfg.output_dir if storage.is_remote(self.cfg.output_dir) else None

    @property
    def work(self) -> WorkDir:
        return WorkDir(self.out / "work")

    @property
    def n(self) -> int:
        return self.cfg.run.num_tasks

    def input_files(self, skipped: list[Path] | None = None) -> tuple[list[Path], Path]:
        """Sorted input files and their root; files no reader handles go to ``skipped``."""
        from data_prep.readers import expand_inputs

        root = storage.as_path(self.cfg.input_root) if self.cfg.input_root else Path.cwd()
        other: list[Path] = []
        try:
            files = expand_inputs(self.cfg.inputs, root=root if self.cfg.input_root else None, skipped=other)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}{self._root_hint()}") from None
        if not files:
            more = f" and {len(other) - 20} more" if len(other) > 20 else ""
            raise FileNotFoundError(f"prep.inputs={self.cfg.inputs}: no jsonl/json/parquet/txt files found (plain, "
                                    f".zst, .gz or .bz2); skipped: {[str(p) for p in other[:20]]}{more}")
        if skipped is not None:
            skipped.extend(other)
        return files, root

    def input_state(self, i: int) -> InputState:
        """The input list and the fingerprints of the files of clean task ``i`` (computed once per task,
        before the files are read, so a file changed while it is read shows as changed next time)."""
        if i not in self._inputs:
            skipped: list[Path] = []
            files, root = self.input_files(skipped)
            rel = [storage.relative(p, root) for p in files]
            mode = self.cfg.run.input_fingerprint
            mine = {rel[k]: input_fingerprint(files[k], mode) for k in range(i, len(files), self.n)}
            self._inputs[i] = InputState(files, root, rel, skipped, mode, config_hash(rel), mine)
        return self._inputs[i]

    def _root_hint(self) -> str:
        """Why a relative pattern found nothing: it is looked for under ``input_root``, not the current directory."""
        import glob

        root = self.cfg.input_root
        if not root or storage.is_remote(root):
            return ""
        here = [p for p in self.cfg.inputs if not os.path.isabs(p) and glob.glob(p, recursive=True)]
        if not here:
            return f" under input_root={root}"
        fixed = [os.path.relpath(p, root) for p in here]
        return (f" under input_root={root} (relative inputs are looked for under input_root); {here} exist relative "
                f"to the current directory: use inputs=[{','.join(fixed)}]")

    def result(self, stage: str, index: int = 0) -> dict[str, Any]:
        """The stored result of a finished task of an earlier stage (raises if it has not run)."""
        from data_prep.tasks import Marker

        spec = STAGE_BY_NAME[stage]
        n = self.n if spec.parallel else 1
        res = Marker(self.work.root, stage, index, n, stage_hashes(self.cfg)[stage]).result()
        if res is None:
            raise RuntimeError(f"stage {stage!r} task {index} of {n} has not finished (no matching marker under "
                               f"{self.work.markers})")
        return res


def read_clean(path: Path) -> Iterator[tuple[int, Document]]:
    """(order key, document) of a clean part, in order."""
    with open(path, "rb") as raw:
        for line in io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), 1 << 20):
            rec = json.loads(line)
            yield rec["k"], Document(id=rec["id"], text=rec["text"], source=rec["source"])


def kept_docs(ctx: Context, part: int, wanted: tuple[int, ...]) -> Iterator[tuple[int, int, int, Document]]:
    """(row, code, key, document) of the clean rows of ``part`` whose split code is in ``wanted``."""
    codes = np.load(ctx.work.split_codes(part))
    for row, (key, doc) in enumerate(read_clean(ctx.work.clean_part(part))):
        if codes[row] in wanted:
            yield row, int(codes[row]), key, doc


# ---------------------------------------------------------------------------------------------- stages


def clean_inputs(ctx: Context, i: int) -> dict[str, Any]:
    """Read input files i, i+n, ...; normalize; filter; write clean part i."""
    from data_prep.filters import QualityFilter, ShortDocumentFilter
    from data_prep.normalize import Normalize
    from data_prep.readers import DocumentReader, skip_reason

    cfg = ctx.cfg
    state = ctx.input_state(i)
    files, root, rel = state.files, state.root, state.rel
    file_index = {r: k for k, r in enumerate(rel)}
    stats = PrepStats()
    if i == 0:  # once: the file list document keys index into, and the files no reader handles
        write_json(ctx.work.inputs, {"root": str(root), "files": rel}, indent=None)
        for p in state.skipped:
            stats.error(storage.relative(p, root), None, skip_reason(p))
            stats.bad_file(storage.relative(p, root), skip_reason(p))
            stats.drop(DocumentReader.name, "unsupported_file")
    mine = files[i :: ctx.n]
    docs = DocumentReader(mine, root, cfg.text_key, cfg.source_key, stats=stats).run()
    docs = Normalize(cfg.normalize_form, stats=stats, ftfy=cfg.ftfy).run(docs)
    docs = ShortDocumentFilter(cfg.min_doc_chars, stats=stats).run(docs)
    if cfg.quality.enabled:
        docs = QualityFilter(cfg.quality, stats=stats).run(docs)
    n = 0
    out_hash = hashlib.sha256()  # of the part's records: later stages re-run only when it changes
    with atomic_path(ctx.work.clean_part(i)) as tmp, open(tmp, "wb") as raw, \
            zstandard.ZstdCompressor(level=1).stream_writer(raw) as w:
        for d in progress(docs, f"clean {i}/{ctx.n}"):
            name, _, line = d.id.rpartition(":")
            rec = {"k": key_of(file_index[name], int(line)), "id": d.id, "source": d.source, "text": d.text}
            data = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
            w.write(data)
            out_hash.update(data)
            n += 1
    write_json(ctx.work.input_fingerprints(i, ctx.n), {"mode": state.mode, "list_digest": state.list_digest,
                                                       "total_files": len(files), "files": state.mine}, indent=None)
    return {"stats": stats.to_dict(), "docs": n, "files": len(mine), "total_files": len(files),
            "inputs_digest": state.digest, "output_sha256": out_hash.hexdigest()}


def clean_inputs_changed(ctx: Context, i: int, done: dict[str, Any]) -> str | None:
    """Why finished clean task ``i`` must re-run although its config matches: a file it read was added,
    removed, or changed (size, mtime or content), or the input list changed (that moves file indices
    and which task reads which file, so every clean task re-runs). None when nothing changed."""
    state = ctx.input_state(i)
    if done.get("inputs_digest") == state.digest:
        return None
    path = ctx.work.input_fingerprints(i, ctx.n)
    if not path.is_file():
        return f"no record of its input files ({path})"
    old = json.loads(path.read_text())
    if old["mode"] != state.mode:
        return f"run.input_fingerprint changed from {old['mode']} to {state.mode}"
    why: list[str] = []
    if old["list_digest"] != state.list_digest:
        before = set(ctx.work.input_files()) if ctx.work.inputs.is_file() else set()
        added, removed = sorted(set(state.rel) - before), sorted(before - set(state.rel))
        for verb, names in (("added", added), ("removed", removed)):
            if names:
                why.append(f"input file{'s' * (len(names) > 1)} {verb}: " + ", ".join(names[:5])
                           + (f" and {len(names) - 5} more" if len(names) > 5 else ""))
        if not why:
            why.append(f"the input file list changed ({old['total_files']} files before, {len(state.rel)} now)")
    for name, now in state.mine.items():
        prev = old["files"].get(name)
        if prev is not None and prev != now:
            what = f"size {prev[0]} -> {now[0]}" if prev[0] != now[0] else (
                "content changed" if state.mode == "content" else "modification time changed")
            why.append(f"{storage.join(state.root, name)} changed ({what})")
    return "; ".join(why) or "its input fingerprint changed"


def compute_signatures(ctx: Context, i: int) -> dict[str, Any]:
    """Document table and MinHash signatures of clean part i; band records spilled into n buckets."""
    from data_prep.dedup_tasks import write_signatures

    cfg = ctx.cfg
    ngrams = None
    if cfg.decontam.eval_files:
        from data_prep.decontam import eval_ngrams, eval_texts

        ngrams = eval_ngrams(eval_texts(cfg.decontam.eval_files, cfg.text_key), cfg.decontam.ngram,
                             cfg.decontam.min_words, cfg.dedup.punctuation)
    docs = progress(read_clean(ctx.work.clean_part(i)), f"signatures {i}/{ctx.n}")
    res = write_signatures(docs, i, ctx.n, cfg.dedup, ctx.work, eval_ngrams=ngrams)
    if ngrams is not None:
        res["eval_examples"] = ngrams.examples
        res["eval_examples_too_short"] = ngrams.too_short
    return res


def verify_buckets(ctx: Context, i: int) -> dict[str, Any]:
    """Candidate pairs of bucket shard i, verified, as a spanning forest of the duplicates."""
    from data_prep.dedup_tasks import verify_bucket

    return verify_bucket(i, ctx.n, ctx.cfg.dedup, ctx.work, memory_bytes=ctx.cfg.run.bucket_memory_mb << 20)


def find_clusters(ctx: Context, i: int) -> dict[str, Any]:
    """Connected components of all verified pairs; the rows each part loses."""
    from data_prep.dedup_tasks import find_components

    return find_components(ctx.n, ctx.n, ctx.work)


def record_removals(ctx: Context, i: int) -> dict[str, Any]:
    """The removed.jsonl records of part i."""
    from data_prep.dedup_tasks import record_removals as records

    return records(i, ctx.n, ctx.cfg.dedup, ctx.work)


def split_holdout(ctx: Context, i: int) -> dict[str, Any]:
    """removed.jsonl; holdout (ratio or count); hash and n-gram decontamination."""
    from data_prep.dedup_tasks import merge_removed_records
    from data_prep.retention_report import nothing_read

    # Stop here, clearly, when every input file was bad, rather than in the tokenizer on an empty sample.
    if (error := nothing_read([ctx.result("clean", p) for p in range(ctx.n)])) is not None:
        raise RuntimeError(error)
    merge_removed_records(ctx.n, ctx.work, ctx.out / "removed.jsonl")
    stats, train_bytes = assign_splits(ctx.work, ctx.n, ctx.cfg.holdout.ratio, ctx.cfg.holdout.count)
    return {"stats": stats.to_dict(), "train_bytes": train_bytes}


def train_tokenizer(ctx: Context, i: int) -> dict[str, Any]:
    """Train SentencePiece on a weighted reservoir sample of the train split (or copy a .model)."""
    from data_prep.mixture import check_sources, source_factors
    from data_prep.text_hash import hash_fraction
    from data_prep.tokenizer import WeightedReservoir, obtain_tokenizer, sample_cap, tokenizer_info, trainer_memory_mb

    cfg = ctx.cfg
    out = ctx.out / "tokenizer.model"
    info: dict[str, Any] = {}
    sample: list[str] = []
    check_sources(cfg.mixture, ctx.work.sources(ctx.n))  # the first stage that uses the mixture
    if cfg.tokenizer.model_path is None:
        train_bytes = ctx.result("split")["train_bytes"]
        # Mixture weights from bytes (tokens are not known before the tokenizer exists). Only the
        # relative weights matter for the sample, so the total (in tokens) is left out here.
        relative = dataclasses.replace(cfg.mixture, total_tokens=None)
        use = cfg.tokenizer.sample_by_mixture and train_bytes
        factors = source_factors(relative, train_bytes, "bytes") if use else {}
        cap = sample_cap(cfg.tokenizer)
        info["sample_cap_bytes"] = cap
        info["estimated_trainer_memory_mb"] = trainer_memory_mb(min(cap, sum(train_bytes.values())))
        print(f"tokenizer: sampling up to {cap / 1e6:.1f} MB with weights {factors}; trainer memory estimate "
              f"{info['estimated_trainer_memory_mb']} MB", file=sys.stderr)
        res = WeightedReservoir(cap)
        for p in range(ctx.n):
            for _, _, key, d in progress(kept_docs(ctx, p, (TRAIN,)), f"tokenizer sample {p}/{ctx.n}"):
                res.offer(hash_fraction("tok:" + d.id), factors.get(d.source, 1.0), key, d.text)
        info["sample_bytes"] = res.bytes
        sample = res.texts()
        if not any(t.strip() for t in sample):
            docs = sum(ctx.result("clean", p)["docs"] for p in range(ctx.n))
            raise ValueError(f"no training text for the tokenizer: inputs={list(cfg.inputs)} (input_root="
                             f"{cfg.input_root}) yielded {docs} documents after cleaning and none in the train split; "
                             "give inputs with longer documents (min_doc_chars) or tokenizer=pretrained")
    what = (f"copying {cfg.tokenizer.model_path}" if cfg.tokenizer.model_path is not None else
            f"training SentencePiece BPE ({cfg.tokenizer.vocab_size:,} pieces) on {info['sample_bytes'] / 1e6:.1f} MB")
    with Heartbeat(f"tokenizer: {what}"):  # SentencePiece reports nothing while it trains
        obtain_tokenizer(cfg.tokenizer, sample, out, cfg.seed)
    return {**tokenizer_info(out), "training": info}


def tokenize_docs(ctx: Context, i: int) -> dict[str, Any]:
    """Encode the kept documents of part i (long documents piecewise); record each one's mixture draw."""
    import sentencepiece as spm

    from data_prep.mixture import mixture_draw
    from data_prep.pack import encode_texts
    from data_prep.shard_format import token_dtype

    tok = ctx.result("tokenizer")
    sp = spm.SentencePieceProcessor(model_file=str(ctx.out / tok["file"]))
    dtype = token_dtype(tok["vocab_size"])
    bin_path, idx_path = ctx.work.tokens(i)
    record = np.dtype([("row", np.int64), ("count", np.int64), ("draw", np.float64)])
    index: list[np.ndarray] = []  # per batch: (row, count, draw) of its documents, numbers not objects
    stats = PrepStats()
    batch: list[tuple[int, int, int, Document]] = []

    def flush(fh) -> None:
        ids = encode_texts(sp, [d.text for *_, d in batch], ctx.cfg.long_doc_chars)
        for (_, code, _, d), t in zip(batch, ids, strict=True):
            fh.write(np.asarray(t, dtype=dtype).tobytes())
            step = f"tokenize_{SPLITS[code]}"
            stats.add(step, d.source, "in", 1, d.nbytes)
            stats.add(step, d.source, "out", 1, d.nbytes)
        rec = np.zeros(len(batch), record)
        rec["row"] = [row for row, *_ in batch]
        rec["count"] = [len(t) for t in ids]
        rec["draw"] = [mixture_draw(d.id, ctx.cfg.mixture.seed) for *_, d in batch]
        index.append(rec)
        batch.clear()

    with atomic_path(bin_path) as tmp, open(tmp, "wb") as fh:
        for item in progress(kept_docs(ctx, i, (TRAIN, VAL)), f"tokenize {i}/{ctx.n}"):
            batch.append(item)
            if len(batch) >= 64:
                flush(fh)
        if batch:
            flush(fh)
    idx = np.concatenate(index) if index else np.zeros(0, record)
    save_npz(idx_path, row=idx["row"], count=idx["count"], draw=idx["draw"])
    return {"stats": stats.to_dict(), "docs": len(idx), "tokens": int(idx["count"].sum())}


def plan_streams(ctx: Context, i: int) -> dict[str, Any]:
    """Plan the token stream of each split once (every shards task and the report map it)."""
    from data_prep.plan import plan_split

    cfg = ctx.cfg
    out: dict[str, Any] = {}
    for code, name in enumerate(SPLITS):
        plan = plan_split(ctx.work, ctx.n, code, cfg.mixture, cfg.block_size, cfg.samples_per_shard,
                          cfg.shard_divisor)
        summary = plan.save(ctx.work, name)
        out[name] = {k: summary[k] for k in ("blocks", "shards")}
    return out


def write_shards(ctx: Context, i: int) -> dict[str, Any]:
    """Write shards i, i+n, ... of each split from the planned streams."""
    from data_prep.mixture import realized
    from data_prep.plan import SplitPlan, stream_tokens
    from data_prep.shard_format import ShardWriter, shard_name, token_dtype

    cfg = ctx.cfg
    tok = ctx.result("tokenizer")
    ctx.result("plan")  # fails clearly if the plan stage has not run with this config
    dtype = token_dtype(tok["vocab_size"])
    B = cfg.block_size
    written = 0
    if ctx.remote_out:
        claim_remote_output(ctx)
    plans = {name: SplitPlan.load(ctx.work, name) for name in SPLITS}
    blocks = sum(int(p.shard_blocks[i :: ctx.n].sum()) for p in plans.values())
    with Progress(f"shards {i}/{ctx.n}", "block", total=blocks) as bar:
        for split_name, plan in plans.items():
            for s in range(i, plan.shards, ctx.n):
                start, n_blocks = int(plan.shard_start[s]), int(plan.shard_blocks[s])
                toks, srcs = stream_tokens(ctx.work, plan, start, start + n_blocks * B, dtype, tok["eos_id"])
                writer = ShardWriter(ctx.out / shard_name(split_name, s), s, dtype)
                for b in range(n_blocks):
                    sl = slice(b * B, (b + 1) * B)
                    c = np.bincount(srcs[sl], minlength=len(plan.sources))
                    writer.add(toks[sl], {plan.sources[k]: int(v) for k, v in enumerate(c) if v})
                    bar.update()
                entry = writer.close(B)
                if ctx.remote_out:  # one PUT: the object appears whole or not at all
                    local = ctx.out / shard_name(split_name, s)
                    storage.put_file(local, storage.join(ctx.remote_out, local.name))
                    local.unlink()
                entry["proportions"] = realized(entry["tokens_per_source"])
                write_json(ctx.work.shard_entry(split_name, s), entry, indent=None)
                written += 1
    return {"shards_written": written}


def report_dataset(ctx: Context, i: int) -> dict[str, Any]:
    """manifest.json (written last), prep_report.{json,md,png}, prep_stats.json."""
    from data_prep.dataset_manifest import write_manifest_and_report

    earlier = [(s.name, s.parallel) for s in STAGES if s.name != "report"]
    result = write_manifest_and_report(ctx, earlier, stage_hashes(ctx.cfg))
    if ctx.remote_out:
        upload_outputs(ctx)
    return result


def claim_remote_output(ctx: Context) -> None:
    """Before a shard goes to a URL ``output_dir``: refuse one that holds another dataset's manifest
    (its shards would be overwritten) unless ``run.force``, which first removes that manifest, so a
    reader never pairs it with new shards. A manifest of this same config is left: its shards are
    rewritten byte for byte."""
    from data_prep.shard_format import MANIFEST

    url = storage.join(ctx.remote_out, MANIFEST)
    if not storage.exists(url):
        return
    theirs = json.loads(storage.read_bytes(url)).get("prep_config_hash")
    if theirs == stage_hashes(ctx.cfg)["shards"]:
        return
    if not ctx.cfg.run.force:
        raise FileExistsError(f"{url} is the manifest of another dataset (prep_config_hash {str(theirs)[:12]}…); its "
                              "shards would be overwritten: choose another output_dir, or set run.force=true to "
                              "replace it (its manifest is removed first)")
    fs, path = storage.filesystem(url)
    fs.rm_file(path)


def upload_outputs(ctx: Context) -> None:
    """The outputs besides the shards (uploaded as written) to the URL ``output_dir``, ``manifest.json``
    last: a reader that finds the manifest finds everything it lists."""
    from data_prep.shard_format import MANIFEST

    files = sorted(p for p in ctx.out.iterdir() if p.is_file() and p.name != MANIFEST)
    for p in [*files, ctx.out / MANIFEST]:
        storage.put_file(p, storage.join(ctx.remote_out, p.name))


# ---------------------------------------------------------------------------------------------- the list


@dataclass(frozen=True)
class Stage:
    """One stage: its name (the CLI's ``run.stage``), what a task runs, whether it has ``num_tasks``
    tasks or one, and the config values it depends on beyond the stage before it (a change re-runs
    it and everything after it)."""

    name: str
    run: Callable[[Context, int], dict[str, Any]]
    parallel: bool
    depends: Callable[[PrepConfig], list[Any]]
    # Why a finished task must re-run although its config matches (what it reads from outside the
    # work directory changed); None when it need not.
    stale: Callable[[Context, int, dict[str, Any]], str | None] | None = None


STAGES: tuple[Stage, ...] = (
    Stage("clean", clean_inputs, True, lambda c: [c.inputs, c.input_root, c.text_key, c.source_key, c.normalize_form,
                                                  c.ftfy, c.min_doc_chars, dataclasses.asdict(c.quality), c.num_tasks],
          stale=clean_inputs_changed),
    Stage("signatures", compute_signatures, True, lambda c: [dataclasses.asdict(c.dedup),
                                                             dataclasses.asdict(c.decontam)]),
    Stage("buckets", verify_buckets, True, lambda c: []),
    Stage("components", find_clusters, False, lambda c: []),
    Stage("removals", record_removals, True, lambda c: []),
    Stage("split", split_holdout, False, lambda c: [dataclasses.asdict(c.holdout)]),
    Stage("tokenizer", train_tokenizer, False, lambda c: [
        dataclasses.asdict(c.tokenizer), dataclasses.asdict(c.mixture) if c.tokenizer.sample_by_mixture else None,
        c.seed]),
    Stage("tokenize", tokenize_docs, True, lambda c: [c.long_doc_chars, c.mixture.seed]),  # seeds the draws
    Stage("plan", plan_streams, False, lambda c: [dataclasses.asdict(c.mixture), c.seq_len, c.samples_per_shard,
                                                  c.shard_divisor]),
    Stage("shards", write_shards, True, lambda c: []),
    Stage("report", report_dataset, False, lambda c: []),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}


def stage_hashes(cfg: PrepConfig) -> dict[str, str]:
    """Config hash of each stage, chained: a change re-runs its stage and everything after it.

    The stages after ``clean`` also chain the sha256 of every clean part (from the clean markers), so
    a changed input file re-runs everything downstream of the part it lands in, and a clean task that
    re-ran with the same output (a touched file) re-runs nothing after it.
    """
    h: dict[str, str] = {}
    prev: list[Any] = []
    for stage in STAGES:
        h[stage.name] = config_hash(prev + stage.depends(cfg))
        prev = [h[stage.name]]
        if stage.name == "clean":
            prev.append(_clean_outputs(cfg.local_out() / "work", cfg.run.num_tasks, h["clean"]))
    return h


_CLEAN_OUTPUTS: dict[Path, tuple[tuple[int, int, int], str, str | None]] = {}


def _clean_outputs(work: Path, n: int, clean_hash: str) -> list[str | None]:
    """The ``output_sha256`` of each finished clean task (None where none matches), cached per marker file."""
    from data_prep.tasks import Marker

    out: list[str | None] = []
    for i in range(n):
        marker = Marker(work, "clean", i, n, clean_hash)
        try:
            st = marker.path.stat()
        except FileNotFoundError:
            out.append(None)
            continue
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = _CLEAN_OUTPUTS.get(marker.path)
        if cached is None or cached[:2] != (stamp, clean_hash):
            res = marker.result()
            cached = (stamp, clean_hash, res.get("output_sha256") if res else None)
            _CLEAN_OUTPUTS[marker.path] = cached
        out.append(cached[2])
    return out


def clear_outputs(out: Path) -> None:
    """Remove the work directory (``run.force=true``)."""
    shutil.rmtree(out / "work", ignore_errors=True)
