"""Decontamination: n-grams of user-supplied evaluation files, matched against training documents.

Evaluation files are read like the inputs (JSON lines, JSON arrays or parquet, any supported
compression, ``text_key`` field) or are plain text (one example per non-empty line). Their word
n-grams are hashed exactly as the dedup shingles are (normalized words, same window hash), so a
training document is contaminated when it shares any n-gram with an evaluation example (GPT-3 used
13-grams).

An example shorter than ``n`` words has no n-gram; as GPT-3 did, such an example is matched whole
(a training document containing its full word sequence is contaminated) when it has at least
``min_words`` words. Shorter ones would match ordinary text by chance, so they are not checked, and
the report counts them.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.readers import SUFFIXES, TEXT_SUFFIXES, DocumentReader, has_suffix
from data_prep.stats import PrepStats
from data_prep.text_hash import window_hashes, word_hashes


def eval_texts(files: Iterable[str], text_key: str = "text") -> list[str]:
    """Texts of the evaluation files; bad input is an error naming file and line (eval data must be clean).

    JSON lines, ``.json`` (lines or one array) and parquet files, compressed or not, are read by the
    input readers with the same ``text_key``; any other file is plain text, one example per non-empty line.
    """
    texts: list[str] = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"prep.decontam.eval_files: {name!r} does not exist")
        if has_suffix(path, TEXT_SUFFIXES) or not has_suffix(path, SUFFIXES):
            texts.extend(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
            continue
        stats = PrepStats()
        docs = list(DocumentReader([path], path.parent, text_key=text_key, stats=stats).run())
        if stats.errors:
            bad = [
                f"{name}:{e['line']}: {e['reason']}" if e["line"] else f"{name}: {e['reason']}" for e in stats.errors
            ]
            n = stats.errors_total
            more = f"; ... and {n - 5} more" if n > 5 else ""
            raise ValueError(f"prep.decontam.eval_files: {n} bad record(s): {'; '.join(bad[:5])}{more}")
        texts.extend(d.text for d in docs)
    return texts


@dataclass
class EvalNgrams:
    """Hashes of the evaluation examples' word windows, by window length.

    Attributes:
        hashes: window length -> sorted unique hashes. ``n`` holds the n-grams of the examples of at
            least ``n`` words; a shorter length ``L`` holds whole examples of ``L`` words.
        examples: evaluation examples read.
        too_short: examples with fewer than ``min_words`` words (not checked).
    """

    hashes: dict[int, np.ndarray] = field(default_factory=dict)
    examples: int = 0
    too_short: int = 0

    def contaminated(self, words: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Per document of a batch (word hashes back to back, words per document): does it share a
        window with an evaluation example?"""
        hit = np.zeros(len(counts), bool)
        for length, table in self.hashes.items():
            if not len(table):
                continue
            wins, per_doc = window_hashes(words, counts, length)
            doc_of = np.repeat(np.arange(len(counts)), per_doc)
            # table is sorted and unique: a binary search, not np.isin's sort per batch
            j = np.minimum(np.searchsorted(table, wins), len(table) - 1)
            found = table[j] == wins
            # A document shorter than the window gets one window over its fewer words; entries span
            # exactly ``length`` words, so it matches none of them (barring a 64-bit collision).
            hit[doc_of[found]] = True
        return hit


def eval_ngrams(texts: list[str], ngram: int = 13, min_words: int = 8, punctuation: str = "delete") -> EvalNgrams:
    """Window hashes of the evaluation ``texts`` (see :class:`EvalNgrams`), normalized as the training
    documents are (``punctuation`` is ``dedup.punctuation``)."""
    out = EvalNgrams(examples=len(texts))
    if not texts:
        return out
    words, counts, _ = word_hashes(texts, punctuation)
    first = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    out.too_short = int((counts < min(min_words, ngram)).sum())
    groups = {ngram: np.nonzero(counts >= ngram)[0]}
    for length in sorted(set(counts[(counts >= min_words) & (counts < ngram)].tolist())):
        groups[int(length)] = np.nonzero(counts == length)[0]
    for length, docs in groups.items():
        sel = (
            np.concatenate([words[first[d] : first[d] + counts[d]] for d in docs])
            if len(docs)
            else np.zeros(0, np.uint64)
        )
        wins, _ = window_hashes(sel, counts[docs], length)
        out.hashes[length] = np.unique(wins)
    return out
