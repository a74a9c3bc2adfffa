"""Typed configuration of the data stage (``conf/prep.yaml`` composes into this)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_prep import storage
from data_prep.dedup_core import DedupConfig
from data_prep.filters import QualityConfig
from data_prep.mixture import MixtureConfig
from data_prep.tokenizer import TokenizerConfig


@dataclass
class RunConfig:
    """How a prep run executes. Apart from ``num_tasks`` (it sets how documents are grouped into
    parts, so work files of another task count are not reused) none of this enters a config hash.

    Attributes:
        num_tasks: every parallel stage runs as this many tasks (files are split among them).
        workers: local processes running those tasks (default: num_tasks, at most the CPU count).
        stage: ``all`` runs every stage locally; a stage name runs only task ``task_index`` of it
            (what a SLURM array task does).
        task_index: the task to run with ``stage=<name>``; default ``$SLURM_ARRAY_TASK_ID``.
        force: redo stages even when their completion marker matches.
        bucket_memory_mb: a buckets task reads its shard in as many passes as keep its band records
            under this (the result does not depend on it).
        input_fingerprint: how a clean task tells whether its input files changed since it ran:
            ``stat`` (path, size and modification time; one stat per file; an object's size and ETag)
            or ``content`` (size and sha256 of the bytes: a full read, for file systems whose mtimes
            cannot be trusted).
        local_dir: with an ``output_dir`` URL (``s3://…``): the local or shared folder where the work
            files and the outputs are written before upload. Each shard is uploaded when written
            and then removed here; the other outputs follow at the end and ``manifest.json`` last.
    """

    num_tasks: int = 1
    workers: int | None = None
    stage: str = "all"
    task_index: int | None = None
    force: bool = False
    bucket_memory_mb: int = 2048
    input_fingerprint: str = "stat"
    local_dir: str | None = None

    def __post_init__(self) -> None:
        if self.local_dir is not None and storage.is_remote(self.local_dir):
            raise ValueError(f"prep.run.local_dir={self.local_dir}: must be a local or shared path (the work files "
                             "are read and written in place)")
        if self.input_fingerprint not in ("stat", "content"):
            raise ValueError(f"prep.run.input_fingerprint={self.input_fingerprint!r}: expected stat or content")
        if self.num_tasks < 1:
            raise ValueError(f"prep.run.num_tasks={self.num_tasks}: must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"prep.run.workers={self.workers}: must be >= 1")
        if self.bucket_memory_mb < 16:
            raise ValueError(f"prep.run.bucket_memory_mb={self.bucket_memory_mb}: must be >= 16")


@dataclass
class HoldoutConfig:
    """The validation split, chosen by a hash of each document's id.

    Attributes:
        ratio: fraction of documents that go to the validation split.
        count: an absolute number of holdout documents instead (overrides the ratio).
    """

    ratio: float = 0.02
    count: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"prep.holdout.ratio={self.ratio}: must be in [0, 1)")
        if self.count is not None and self.count < 0:
            raise ValueError(f"prep.holdout.count={self.count}: must be >= 0")


@dataclass
class DecontamConfig:
    """Decontamination against evaluation sets (training documents sharing a word n-gram are dropped).

    Attributes:
        eval_files: evaluation sets (read like the inputs, or plain text: one example per line).
        ngram: n of the n-gram match.
        min_words: an evaluation example shorter than ``ngram`` words is matched whole when it has
            at least this many words (GPT-3: 8); shorter ones are not checked.
    """

    eval_files: list[str] = field(default_factory=list)
    ngram: int = 13
    min_words: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min_words <= self.ngram:
            raise ValueError(f"prep.decontam.min_words={self.min_words}: must be in [1, decontam.ngram={self.ngram}]")


@dataclass
class PrepConfig:
    """Everything ``slimpajama-prep`` needs.

    Attributes:
        inputs: globs or directories of jsonl / jsonl.zst / jsonl.gz / parquet / txt files, e.g.
            ``train/chunk*/example_train_*.jsonl.zst``; relative ones are relative to ``input_root``.
        input_root: relative inputs are found under it, and document ids are ``<path relative to
            this>:<line>``; ``null``: the current directory.
        output_dir: where shards, manifest, tokenizer and report go.
        text_key / source_key: dotted field names of the text and the source (domain).
        normalize_form: Unicode normalization form.
        ftfy: repair text with ``ftfy.fix_text`` (SlimPajama did; ~2.5 MB/s, so off by default).
        quality: optional Gopher/C4-style quality filter.
        dedup: global fuzzy dedup (MinHash LSH).
        mixture: per-source weights, or target proportions with an optional total and an epoch cap
            (``prep_mixture=`` presets; see :class:`data_prep.mixture.MixtureConfig`).
        min_doc_chars: SlimPajama's short-document threshold (after lowercasing, punctuation and
            whitespace cleanup).
        holdout: the validation split (ratio or count).
        decontam: n-gram decontamination against evaluation files.
        seq_len: training sequence length; each sample holds ``seq_len + 1`` tokens.
        samples_per_shard: fixed number of samples (blocks) per shard.
        shard_divisor: when > 1, the train shard count is a multiple of it (e.g. ranks x loader
            workers): the blocks beyond the last full group of shards are dropped and reported.
        long_doc_chars: documents longer than this are encoded in pieces cut at line breaks, so a
            megabyte-long document costs what its bytes cost.
        seed: seeds tokenizer training.
        run: how the run executes (tasks, workers, one stage for SLURM); not part of what the data is.
    """

    # the files of conf/prep.yaml's inputs=[train] under input_root=data/demo_corpus (ids relative to the cwd)
    inputs: list[str] = field(default_factory=lambda: ["data/demo_corpus/train"])
    input_root: str | None = None
    output_dir: str = "data/demo_shards"
    text_key: str = "text"
    source_key: str = "meta.redpajama_set_name"
    normalize_form: str = "NFC"
    ftfy: bool = False
    min_doc_chars: int = 200
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    seq_len: int = 256
    samples_per_shard: int = 1024
    shard_divisor: int = 1
    long_doc_chars: int = 65536
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("prep.inputs is empty: give at least one glob or directory")
        storage.check_location(self.output_dir, "output_dir")
        for i, x in enumerate(self.inputs):
            storage.check_location(x, f"inputs[{i}]")
        if self.input_root is not None:
            storage.check_location(self.input_root, "input_root")
        if storage.is_remote(self.output_dir) and self.run.local_dir is None:
            raise ValueError(f"output_dir={self.output_dir}: writing to object storage needs run.local_dir, a local or "
                             "shared folder for the work files and the outputs before upload (tens of GB per 100 GB "
                             "of input: see docs/SCALE.md)")

    def local_out(self) -> Path:
        """Where the outputs and ``work/`` are written: ``output_dir``, or ``run.local_dir`` when
        ``output_dir`` is a URL (the outputs are uploaded from there)."""
        return Path(self.run.local_dir if storage.is_remote(self.output_dir) else self.output_dir)
        if self.seq_len < 1:
            raise ValueError(f"seq_len={self.seq_len}: must be >= 1")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard}: must be >= 1")
        if self.shard_divisor < 1:
            raise ValueError(f"shard_divisor={self.shard_divisor}: must be >= 1")
        if self.long_doc_chars < 1024:
            raise ValueError(f"long_doc_chars={self.long_doc_chars}: must be >= 1024")

    @property
    def block_size(self) -> int:
        return self.seq_len + 1

    @property
    def num_tasks(self) -> int:
        return self.run.num_tasks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def data_dict(self) -> dict[str, Any]:
        """What the data is: every setting except how the run executes (the manifest records this)."""
        d = self.to_dict()
        d.pop("run")
        return d


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def register_configs() -> None:
    """Register the typed schema so ``conf/prep.yaml`` is validated against :class:`PrepConfig`.

    The mixture's source dicts are left open (not in struct mode), so ``mixture.weights={A: 2.0}`` and
    ``mixture.proportions.A=0.3`` work without Hydra's ``+``; their names are checked against the
    corpus's sources when the mixture is used (:func:`data_prep.mixture.check_sources`).
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    node = OmegaConf.structured(PrepConfig)
    for key in ("weights", "proportions"):
        OmegaConf.set_struct(node.mixture[key], False)
    ConfigStore.instance().store(name="prep_schema", node=node)
