"""The work directory (``<output_dir>/work``): every path a stage reads or writes, in one place.

::

    inputs.json                    the sorted input files (document keys index into it)
    inputs/<i>-of-<n>.json         size + mtime (or sha256) of the input files clean task i read
    clean/part-<p>.jsonl.zst       documents of input files p, p+n, ... after normalize + filters
    docs/<p>.npz                   the document table of part p (see data_prep.doc_table)
    dedup/sigs/<p>.u32             MinHash signatures, raw (docs, num_perm) uint32
    dedup/shingles/<p>.u32         sorted 32-bit shingle sets back to back (+ .offsets.npy)
    dedup/bands/<b>/from-<p>.bin   band records of part p that fall in bucket b
    dedup/edges/<b>.npy            verified duplicate pairs of bucket b, reduced to a spanning forest
    dedup/removed/<p>.npz          rows of part p removed as duplicates, their keepers, exact flags
    dedup/removed/<p>.jsonl        their removed.jsonl records, in key order
    split/<p>.npy                  per clean row: 0 train, 1 val, <0 dropped (dedup, decontamination)
    tokens/<p>.bin, <p>.npz        token ids of the kept rows of part p, and their row/count index
    plan/<split>/<array>.npy       the token stream of a split (documents in order, with repeats)
    plan/<split>.json              its summary (sources, blocks, shards, mixture factors)
    shard_entries/<split>-<s>.json one manifest entry per written shard
    markers/<stage>/<i>-of-<n>.json completion markers (data_prep.tasks)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class WorkDir:
    root: Path

    @property
    def inputs(self) -> Path:
        return self.root / "inputs.json"

    def input_files(self) -> list[str]:
        """Input files relative to the input root, in key order (written by the clean stage)."""
        return json.loads(self.inputs.read_text())["files"]

    def input_fingerprints(self, task: int, num_tasks: int) -> Path:
        return self.root / "inputs" / f"{task:05d}-of-{num_tasks:05d}.json"

    def clean_part(self, part: int) -> Path:
        return self.root / "clean" / f"part-{part:05d}.jsonl.zst"

    def docs(self, part: int) -> Path:
        return self.root / "docs" / f"{part:05d}.npz"

    def sources(self, num_parts: int) -> list[str]:
        """Every source name of the corpus after cleaning (from the document tables' ``sources.json``)."""
        names: set[str] = set()
        for p in range(num_parts):
            names.update(json.loads((self.docs(p) / "sources.json").read_text()))
        return sorted(names)

    def sigs(self, part: int) -> Path:
        return self.root / "dedup" / "sigs" / f"{part:05d}.u32"

    def shingles(self, part: int) -> Path:
        return self.root / "dedup" / "shingles" / f"{part:05d}.u32"

    def shingle_offsets(self, part: int) -> Path:
        return self.root / "dedup" / "shingles" / f"{part:05d}.offsets.npy"  # written after the data

    def bands(self, bucket: int, part: int) -> Path:
        return self.root / "dedup" / "bands" / f"{bucket:05d}" / f"from-{part:05d}.bin"

    def edges(self, bucket: int) -> Path:
        return self.root / "dedup" / "edges" / f"{bucket:05d}.npy"

    def removed(self, part: int) -> Path:
        return self.root / "dedup" / "removed" / f"{part:05d}.npz"

    def removed_records(self, part: int) -> Path:
        return self.root / "dedup" / "removed" / f"{part:05d}.jsonl"

    def split_codes(self, part: int) -> Path:
        return self.root / "split" / f"{part:05d}.npy"

    def tokens(self, part: int) -> tuple[Path, Path]:
        return self.root / "tokens" / f"{part:05d}.bin", self.root / "tokens" / f"{part:05d}.npz"

    def plan_dir(self, split: str) -> Path:
        return self.root / "plan" / split

    def plan_summary(self, split: str) -> Path:
        return self.root / "plan" / f"{split}.json"

    def shard_entry(self, split: str, shard: int) -> Path:
        return self.root / "shard_entries" / f"{split}-{shard:06d}.json"

    @property
    def markers(self) -> Path:
        return self.root / "markers"


def load_removed(work: WorkDir, part: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, exact) of the documents of ``part`` removed as duplicates; ``exact``: an earlier
    member of the cluster has the same text."""
    with np.load(work.removed(part)) as z:
        return z["row"], z["exact"]
