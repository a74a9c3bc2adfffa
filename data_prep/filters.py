"""Document filters: each implements one predicate (drop reasons are counted by the base class)."""
from __future__ import annotations

import re
import string
from dataclasses import dataclass

from data_prep.doc_pass import Filter
from data_prep.document import Document
from data_prep.stats import PrepStats

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_WS = re.compile(r"\s+")


def slimpajama_clean_length(text: str) -> int:
    """Length of ``text`` after SlimPajama's cleaning: lowercase, strip ASCII punctuation, collapse whitespace."""
    cleaned = _WS.sub(" ", _PUNCT.sub("", text.lower())).strip()
    return len(cleaned)


class ShortDocumentFilter(Filter):
    """SlimPajama's filter: drop documents shorter than ``min_chars`` after cleaning (default 200)."""

    name = "short_filter"

    def __init__(self, min_chars: int = 200, stats: PrepStats | None = None) -> None:
        super().__init__(stats)
        if min_chars < 0:
            raise ValueError(f"prep.min_doc_chars={min_chars}: must be >= 0")
        self.min_chars = min_chars

    def drop_reason(self, doc: Document) -> str | None:
        # Raw length bounds the cleaned length from above, so short raw texts skip the regex work.
        if len(doc.text) < self.min_chars:
            return f"shorter_than_{self.min_chars}_chars"
        # Cleaning a prefix gives a prefix of the cleaned text (up to one trailing space), so a long
        # enough cleaned prefix decides "keep" without cleaning megabytes.
        head = doc.text[: 4 * self.min_chars + 256]
        if len(head) < len(doc.text) and slimpajama_clean_length(head) >= self.min_chars + 1:
            return None
        if slimpajama_clean_length(doc.text) < self.min_chars:
            return f"shorter_than_{self.min_chars}_chars"
        return None


@dataclass
class QualityConfig:
    """Gopher/C4-style quality heuristics (Rae et al. 2021, Raffel et al. 2020); off by default as in SlimPajama.

    Attributes:
        enabled: apply :class:`QualityFilter`.
        min_words / max_words: document length in whitespace-separated words.
        min_mean_word_length / max_mean_word_length: mean characters per word.
        max_symbol_ratio: ``#`` and ``...`` (ellipsis) per word.
        max_duplicate_line_fraction: fraction of non-empty lines that repeat an earlier line.
        min_alpha_word_fraction: fraction of words with at least one letter.
    """

    enabled: bool = False
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_ratio: float = 0.1
    max_duplicate_line_fraction: float = 0.3
    min_alpha_word_fraction: float = 0.8

    def __post_init__(self) -> None:
        if self.min_words > self.max_words:
            raise ValueError(f"prep.quality.min_words={self.min_words} > prep.quality.max_words={self.max_words}")
        if self.min_mean_word_length > self.max_mean_word_length:
            raise ValueError("prep.quality.min_mean_word_length must be <= prep.quality.max_mean_word_length")


_HAS_ALPHA = re.compile(r"[^\W\d_]")


class QualityFilter(Filter):
    """One predicate over the Gopher heuristics; the first failing rule names the drop reason."""

    name = "quality_filter"

    def __init__(self, cfg: QualityConfig, stats: PrepStats | None = None) -> None:
        super().__init__(stats)
        self.cfg = cfg

    def drop_reason(self, doc: Document) -> str | None:
        c = self.cfg
        words = doc.text.split()
        n = len(words)
        if n < c.min_words:
            return "too_few_words"
        if n > c.max_words:
            return "too_many_words"
        mean = sum(map(len, words)) / n
        if not c.min_mean_word_length <= mean <= c.max_mean_word_length:
            return "mean_word_length"
        symbols = doc.text.count("#") + doc.text.count("...") + doc.text.count("\u2026")
        if symbols / n > c.max_symbol_ratio:
            return "symbol_ratio"
        if sum(1 for w in words if _HAS_ALPHA.search(w)) / n < c.min_alpha_word_fraction:
            return "alpha_words"
        lines = [ln.strip() for ln in doc.text.split("\n") if ln.strip()]
        if lines and 1 - len(set(lines)) / len(lines) > c.max_duplicate_line_fraction:
            return "duplicate_lines"
        return None
