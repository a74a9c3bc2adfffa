"""SentencePiece tokenizer: train a Llama-like BPE model on a sample, or load an existing ``.model``."""
from __future__ import annotations

import hashlib
import os
import shutil
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm


@dataclass
class TokenizerConfig:
    """How the tokenizer is obtained.

    Attributes:
        model_path: an existing SentencePiece ``.model``; when set, nothing is trained.
        vocab_size: vocabulary size of a trained model.
        max_sample_bytes: cap on the training sample (SentencePiece holds it all in memory, ~10x).
        character_coverage: fraction of characters covered by pieces; the rest use byte fallback.
        max_sentence_length: longest line (bytes) used for training; longer lines are split.
        threads: trainer threads.
    """

    model_path: str | None = None
    vocab_size: int = 8000
    max_sample_bytes: int = 64_000_000
    character_coverage: float = 0.9999
    max_sentence_length: int = 16384
    threads: int = 2

    def __post_init__(self) -> None:
        if self.model_path is None and self.vocab_size < 300:
            raise ValueError(f"prep.tokenizer.vocab_size={self.vocab_size}: must be >= 300 (256 byte pieces + specials)")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _training_lines(texts: Iterable[str], max_len: int) -> Iterator[str]:
    # SentencePiece learns from "sentences"; lines are the natural unit for code and prose alike.
    # Newlines themselves are never pieces: they encode through byte fallback, as in Llama.
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            while len(line.encode("utf-8")) > max_len:
                cut = max_len // 4  # characters; at most 4 bytes each, so this always fits
                yield line[:cut]
                line = line[cut:]
            yield line


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_path: Path, seed: int = 0) -> Path:
    """Train a BPE model with Llama's settings (byte fallback, split digits, identity normalization).

    The model is written to a temporary name and renamed, so a crash never leaves a partial file.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    # model_writer (not model_prefix): the prefix path would be stored in the model and break
    # byte-identical output across runs.
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(texts, cfg.max_sentence_length),
        model_writer=buf,
        model_type="bpe",
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=cfg.max_sentence_length,
        shuffle_input_sentence=False,
        num_threads=cfg.threads,
        minloglevel=2,
    )
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out_path)
    return out_path


def obtain_tokenizer(cfg: TokenizerConfig, sample: Iterable[str], out_path: Path, seed: int = 0) -> Path:
    """Copy the configured ``.model`` to ``out_path``, or train one there from ``sample``."""
    if cfg.model_path is not None:
        src = Path(cfg.model_path)
        if not src.is_file():
            raise FileNotFoundError(f"prep.tokenizer.model_path={cfg.model_path!r}: no such file")
        spm.SentencePieceProcessor(model_file=str(src))  # fail early on a file that is not a model
        tmp = out_path.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, out_path)
        return out_path
    return train_tokenizer(sample, cfg, out_path, seed)


def tokenizer_info(path: Path) -> dict:
    """What the manifest records about a tokenizer: file, checksum, vocab size and special ids."""
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return {
        "file": path.name,
        "sha256": file_sha256(path),
        "vocab_size": sp.vocab_size(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "pad_id": sp.pad_id(),
        "unk_id": sp.unk_id(),
    }
