"""``slimpajama-prep``: raw corpora -> clean, deduplicated, split, tokenized WebDataset shards.

Stages (each idempotent: a completion marker with the stage's config hash lets re-runs skip it;
outputs are written under temporary names and renamed):

1. ``clean``     read -> normalize -> short-document filter -> exact dedup -> train/holdout split
2. ``tokenizer`` train SentencePiece BPE on a deterministic sample of the train split (or copy a ``.model``)
3. ``shards``    tokenize -> pack into ``seq_len + 1`` blocks -> tar shards + ``manifest.json``

Usage::

    slimpajama-prep                                   # the demo corpus (conf/prep.yaml)
    slimpajama-prep 'inputs=[/data/SlimPajama/train/chunk*]' output_dir=/data/shards seq_len=2048 \
        tokenizer.vocab_size=32000
"""
from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard
from tqdm import tqdm

from data_prep.config import PrepConfig, config_hash
from data_prep.dedup_exact import ExactDedup
from data_prep.document import Document
from data_prep.filters import ShortDocumentFilter
from data_prep.normalize import Normalize
from data_prep.pack import BlockPacker, tokenize
from data_prep.readers import JsonlReader, expand_inputs
from data_prep.shard_format import FORMAT_VERSION, MANIFEST, RecordLayout, ShardWriter, shard_name, token_dtype
from data_prep.split import HashSplit, hash_fraction
from data_prep.stats import PrepStats
from data_prep.tokenizer import obtain_tokenizer, tokenizer_info

SPLITS = ("train", "val")


def _progress(iterable, desc: str, unit: str = "doc"):
    return tqdm(iterable, desc=desc, unit=unit, mininterval=1.0, dynamic_ncols=True, file=sys.stderr)


class Stage:
    """Completion marker of one stage: a JSON file holding the stage's config hash and its results."""

    def __init__(self, work_dir: Path, name: str, cfg_hash: str, force: bool) -> None:
        self.path = work_dir / f"{name}.done.json"
        self.cfg_hash = cfg_hash
        self.force = force

    def finished(self) -> dict[str, Any] | None:
        if self.force or not self.path.is_file():
            return None
        marker = json.loads(self.path.read_text())
        return marker["result"] if marker.get("config_hash") == self.cfg_hash else None

    def complete(self, result: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config_hash": self.cfg_hash, "result": result}, indent=1))
        os.replace(tmp, self.path)


def _doc_line(d: Document) -> bytes:
    return (json.dumps({"id": d.id, "source": d.source, "text": d.text}, ensure_ascii=False) + "\n").encode()


def read_clean(path: Path) -> Iterator[Document]:
    """Documents written by the ``clean`` stage, in order."""
    with open(path, "rb") as raw:
        for line in io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), 1 << 20):
            rec = json.loads(line)
            yield Document(id=rec["id"], text=rec["text"], source=rec["source"])


def stage_clean(cfg: PrepConfig, work: Path) -> dict[str, Any]:
    """Read, normalize, filter, deduplicate and split; write ``clean-{train,val}.jsonl.zst``."""
    root = Path(cfg.input_root) if cfg.input_root else Path.cwd()
    files = expand_inputs(cfg.inputs, root=None)
    if not files:
        raise FileNotFoundError(f"prep.inputs={cfg.inputs}: no .jsonl/.jsonl.zst/.jsonl.gz files found")
    stats = PrepStats()
    docs: Iterator[Document] = JsonlReader(files, root, cfg.text_key, cfg.source_key, stats=stats).run()
    docs = Normalize(cfg.normalize_form, stats=stats).run(docs)
    docs = ShortDocumentFilter(cfg.min_doc_chars, stats=stats).run(docs)
    docs = ExactDedup(stats=stats).run(docs)
    docs = HashSplit(cfg.holdout_ratio, stats=stats).run(docs)

    outs = {s: work / f"clean-{s}.jsonl.zst" for s in SPLITS}
    tmps = {s: outs[s].with_name(outs[s].name + ".tmp") for s in SPLITS}
    bytes_per_split = dict.fromkeys(SPLITS, 0)
    raws = {s: open(tmps[s], "wb") for s in SPLITS}
    writers = {s: zstandard.ZstdCompressor(level=3).stream_writer(raws[s]) for s in SPLITS}
    try:
        for d in _progress(docs, f"clean ({len(files)} files)"):
            writers[d.split].write(_doc_line(d))
            bytes_per_split[d.split] += d.nbytes
    finally:
        for s in SPLITS:
            writers[s].close()
    for s in SPLITS:
        os.replace(tmps[s], outs[s])
    return {"stats": stats.to_dict(), "bytes": bytes_per_split, "files": len(files)}


def stage_tokenizer(cfg: PrepConfig, work: Path, out_dir: Path, train_bytes: int) -> dict[str, Any]:
    """Train (or copy) the tokenizer into ``out_dir/tokenizer.model``."""
    # Deterministic sample: keep a document when its hash falls below the sampling rate.
    rate = min(1.0, cfg.tokenizer.max_sample_bytes / max(1, train_bytes))
    sample = (d.text for d in read_clean(work / "clean-train.jsonl.zst") if rate >= 1.0 or hash_fraction(d.id) < rate)
    path = obtain_tokenizer(cfg.tokenizer, _progress(sample, "tokenizer sample"), out_dir / "tokenizer.model", cfg.seed)
    return tokenizer_info(path)


def stage_shards(cfg: PrepConfig, work: Path, out_dir: Path, tok: dict[str, Any]) -> dict[str, Any]:
    """Tokenize, pack and write shards for each split; return the per-split manifest entries."""
    dtype = token_dtype(tok["vocab_size"])
    splits: dict[str, Any] = {}
    stats = PrepStats()
    for split in SPLITS:
        packer = BlockPacker(cfg.block_size, tok["eos_id"], dtype)
        shards: list[dict[str, Any]] = []
        writer: ShardWriter | None = None
        docs = stats.count(f"tokenize_{split}", read_clean(work / f"clean-{split}.jsonl.zst"), "in")
        tokenized = tokenize(_progress(docs, f"tokenize {split}"), str(out_dir / tok["file"]), threads=cfg.threads)

        def blocks():
            for doc, ids in tokenized:
                stats.add(f"tokenize_{split}", doc.source, "out", 1, doc.nbytes)
                yield from packer.add(ids, doc.source)
            yield from packer.finish()

        for block, per_source in blocks():
            if writer is None:
                writer = ShardWriter(out_dir / shard_name(split, len(shards)), len(shards), dtype)
            writer.add(block, per_source)
            if writer.samples == cfg.samples_per_shard:
                shards.append(writer.close(cfg.block_size))
                writer = None
        if writer is not None:
            shards.append(writer.close(cfg.block_size))
        per_source: dict[str, int] = {}
        for sh in shards:
            for k, v in sh["tokens_per_source"].items():
                per_source[k] = per_source.get(k, 0) + v
        splits[split] = {
            "shards": shards,
            "samples": sum(s["samples"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "tokens_per_source": dict(sorted(per_source.items())),
            "tail_tokens_dropped": packer.tail_tokens,
        }
    return {"splits": splits, "stats": stats.to_dict()}


def run_prep(cfg: PrepConfig) -> dict[str, Any]:
    """Run all stages (skipping finished ones) and write ``manifest.json`` and the report."""
    out_dir = Path(cfg.output_dir)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    full = cfg.to_dict()
    clean_keys = ("inputs", "input_root", "text_key", "source_key", "normalize_form", "min_doc_chars", "holdout_ratio")
    h_clean = config_hash({k: full[k] for k in clean_keys})
    h_tok = config_hash([h_clean, full["tokenizer"], cfg.seed])
    h_shards = config_hash([h_tok, cfg.seq_len, cfg.samples_per_shard])

    clean_stage = Stage(work, "clean", h_clean, cfg.force)
    clean = clean_stage.finished()
    if clean is None:
        clean = stage_clean(cfg, work)
        clean_stage.complete(clean)

    tok_stage = Stage(work, "tokenizer", h_tok, cfg.force)
    tok = tok_stage.finished()
    if tok is None or not (out_dir / "tokenizer.model").is_file():
        tok = stage_tokenizer(cfg, work, out_dir, clean["bytes"]["train"])
        tok_stage.complete(tok)

    shard_stage = Stage(work, "shards", h_shards, cfg.force)
    shards = shard_stage.finished()
    if shards is None:
        shards = stage_shards(cfg, work, out_dir, tok)
        shard_stage.complete(shards)

    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok,
        "seq_len": cfg.seq_len,
        "block_size": cfg.block_size,
        "dtype": token_dtype(tok["vocab_size"]).name,
        "record": RecordLayout.for_block(cfg.block_size, token_dtype(tok["vocab_size"])).__dict__,
        "splits": shards["splits"],
        "totals": {
            k: sum(s[k] for s in shards["splits"].values()) for k in ("samples", "tokens", "bytes")
        },
        "prep_config": full,
        "prep_config_hash": h_shards,
    }
    stats = {"steps": clean["stats"]["steps"] + shards["stats"]["steps"], "errors": clean["stats"]["errors"]}
    _write_json(out_dir / "prep_stats.json", stats)
    (out_dir / "prep_report.md").write_text(PrepStats.from_dict(stats).markdown())
    _write_json(out_dir / MANIFEST, manifest)  # last: its presence means the dataset is complete
    return manifest


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> None:
    """Hydra entry point: compose ``conf/prep.yaml`` with command-line overrides and run."""
    import hydra
    from omegaconf import OmegaConf

    from data_prep.config import conf_dir, register_configs

    register_configs()

    @hydra.main(config_path=str(conf_dir()), config_name="prep", version_base="1.3")
    def _app(dcfg) -> None:
        cfg: PrepConfig = OmegaConf.to_object(dcfg)
        manifest = run_prep(cfg)
        t = manifest["totals"]
        print(f"wrote {t['samples']} samples / {t['tokens']} tokens in {sum(len(s['shards']) for s in manifest['splits'].values())} shards to {cfg.output_dir}")

    _app()


if __name__ == "__main__":
    main()
