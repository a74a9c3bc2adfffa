"""SentencePiece tokenizer: train a Llama-like BPE model on a sample, or load an existing ``.model``."""
from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from data_prep.storage import file_sha256  # one implementation (evaluate imports it from here too)


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
        max_memory_mb: when set, the sample is shrunk so the trainer's estimated memory fits.
        sample_by_mixture: weight the training sample by the mixture. Off, the sample follows the
            post-dedup corpus and the tokenizer (and the tokenized corpus) no longer depend on the
            mixture, so several mixtures share them (``slimpajama-study`` does this, as
            SlimPajama-DC kept one tokenizer for all its configurations).
    """

    model_path: str | None = None
    vocab_size: int = 8000
    max_sample_bytes: int = 64_000_000
    character_coverage: float = 0.9999
    max_sentence_length: int = 16384
    threads: int = 2
    max_memory_mb: int | None = None
    sample_by_mixture: bool = True

    def __post_init__(self) -> None:
        if self.model_path is None and self.vocab_size < 300:
            raise ValueError(
                f"prep.tokenizer.vocab_size={self.vocab_size}: must be >= 300 (256 byte pieces + specials)"
            )


# SentencePiece's BPE trainer holds the sentences, their pieces and pair statistics: measured at
# roughly 10 bytes of memory per byte of sample, plus a fixed ~100 MB.
TRAINER_BYTES_PER_SAMPLE_BYTE = 10
TRAINER_BASE_MB = 100


def trainer_memory_mb(sample_bytes: int) -> int:
    """Estimated peak memory of training on ``sample_bytes`` of text."""
    return TRAINER_BASE_MB + sample_bytes * TRAINER_BYTES_PER_SAMPLE_BYTE // 1_000_000


def sample_cap(cfg: TokenizerConfig) -> int:
    """Bytes of sample to draw: ``max_sample_bytes``, lowered to fit ``max_memory_mb``."""
    cap = cfg.max_sample_bytes
    if cfg.max_memory_mb is not None:
        fit = (cfg.max_memory_mb - TRAINER_BASE_MB) * 1_000_000 // TRAINER_BYTES_PER_SAMPLE_BYTE
        if fit <= 0:
            raise ValueError(
                f"prep.tokenizer.max_memory_mb={cfg.max_memory_mb}: below the trainer's base of {TRAINER_BASE_MB} MB"
            )
        cap = min(cap, fit)
    return cap


class WeightedReservoir:
    """A byte-budgeted weighted reservoir sample (Efraimidis-Spirakis A-Res).

    Each item gets priority ``u ** (1 / w)`` from a uniform ``u`` (here a hash of its id, so the sample
    does not depend on reading order or task count) and its source weight ``w``; the items with the
    highest priorities that fit in ``cap_bytes`` are kept. Memory: the sample itself.
    """

    def __init__(self, cap_bytes: int) -> None:
        import heapq

        self._heapq = heapq
        self.cap = cap_bytes
        self.bytes = 0
        self._heap: list[tuple[float, int, str]] = []

    def offer(self, u: float, weight: float, key: int, text: str) -> None:
        if weight <= 0 or not text:
            return
        text = text[: self.cap]  # one huge document cannot take more than the budget
        prio = u ** (1.0 / weight)
        n = len(text.encode("utf-8"))
        if self.bytes + n > self.cap and self._heap and prio <= self._heap[0][0]:
            return
        self._heapq.heappush(self._heap, (prio, key, text))
        self.bytes += n
        while self.bytes > self.cap and len(self._heap) > 1:
            _, _, dropped = self._heapq.heappop(self._heap)
            self.bytes -= len(dropped.encode("utf-8"))

    def texts(self) -> list[str]:
        """The sample in input order (by key), so training is deterministic."""
        return [t for _, _, t in sorted(self._heap, key=lambda item: item[1])]


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
    sample = sample if isinstance(sample, list) else list(sample)
    if not any(t.strip() for t in sample):  # SentencePiece would stop on "!sentences_.empty()"
        raise ValueError("prep.tokenizer: no training text (the sample is empty); give inputs with documents that "
                         "survive cleaning, or tokenizer=pretrained tokenizer.model_path=...")
    try:
        return train_tokenizer(sample, cfg, out_path, seed)
    except RuntimeError as e:  # SentencePiece: "Vocabulary size too high (8000). Please set it to a value <= 314."
        too_high = re.search(r"Vocabulary size too high \((\d+)\).*?<= ?(\d+)", str(e))
        if too_high is None:
            raise
        raise ValueError(f"prep.tokenizer.vocab_size={too_high[1]}: the training sample supports at most "
                         f"{too_high[2]} pieces; set tokenizer.vocab_size={too_high[2]} (or lower), or give more "
                         "input text") from None


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
