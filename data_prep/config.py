"""Typed configuration of the data stage (``conf/prep.yaml`` composes into this)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any

from data_prep.tokenizer import TokenizerConfig


@dataclass
class PrepConfig:
    """Everything ``slimpajama-prep`` needs.

    Attributes:
        inputs: globs or directories of jsonl / jsonl.zst / jsonl.gz files.
        input_root: document ids are ``<path relative to this>:<line>``; default: the current directory.
        output_dir: where shards, manifest, tokenizer and report go.
        text_key / source_key: dotted field names of the text and the source (domain).
        normalize_form: Unicode normalization form.
        min_doc_chars: SlimPajama's short-document threshold (after lowercasing, punctuation and
            whitespace cleanup).
        holdout_ratio: fraction of documents (by content hash) that go to the validation split.
        seq_len: training sequence length; each sample holds ``seq_len + 1`` tokens.
        samples_per_shard: fixed number of samples (blocks) per shard.
        seed: seeds tokenizer training.
        threads: tokenizer encode/train threads.
        force: redo stages even when their completion marker matches.
    """

    inputs: list[str] = field(default_factory=lambda: ["data/demo_corpus/train"])
    input_root: str | None = None
    output_dir: str = "data/demo_shards"
    text_key: str = "text"
    source_key: str = "meta.redpajama_set_name"
    normalize_form: str = "NFC"
    min_doc_chars: int = 200
    holdout_ratio: float = 0.02
    seq_len: int = 256
    samples_per_shard: int = 1024
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seed: int = 0
    threads: int = 2
    force: bool = False

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("prep.inputs is empty: give at least one glob or directory")
        if self.seq_len < 1:
            raise ValueError(f"seq_len={self.seq_len}: must be >= 1")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard}: must be >= 1")
        if not 0.0 <= self.holdout_ratio < 1.0:
            raise ValueError(f"holdout_ratio={self.holdout_ratio}: must be in [0, 1)")

    @property
    def block_size(self) -> int:
        return self.seq_len + 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def conf_dir() -> Path:
    """The Hydra config directory: ``$SLIMPAJAMA_CONF_DIR``, else ``conf/`` at the repository root."""
    env = os.environ.get("SLIMPAJAMA_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "conf"
    if not (path / "prep.yaml").is_file():
        raise FileNotFoundError(f"no Hydra configs at {path}: install the repository in editable mode (pip install -e .) or set SLIMPAJAMA_CONF_DIR")
    return path


def register_configs() -> None:
    """Register the typed schema so ``conf/prep.yaml`` is validated against :class:`PrepConfig`."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="prep_schema", node=PrepConfig)
