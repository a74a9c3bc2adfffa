"""Document filters: each implements one predicate (drop reasons are counted by the base class)."""
from __future__ import annotations

import re
import string

from data_prep.document import Document
from data_prep.stats import PrepStats
from data_prep.step import Filter

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
        if len(doc.text) < self.min_chars or slimpajama_clean_length(doc.text) < self.min_chars:
            return f"shorter_than_{self.min_chars}_chars"
        return None
