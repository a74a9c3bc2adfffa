"""Unicode normalization step."""
from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Iterator

from data_prep.document import Document
from data_prep.stats import PrepStats
from data_prep.step import PipelineStep


class Normalize(PipelineStep):
    """Unicode normalization (NFC by default, as SlimPajama's ``ftfy.fix_text(normalization="NFC")`` ends with)."""

    name = "normalize"

    def __init__(self, form: str = "NFC", stats: PrepStats | None = None) -> None:
        super().__init__(stats)
        if form not in ("NFC", "NFKC", "NFD", "NFKD"):
            raise ValueError(f"prep.normalize.form={form!r}: expected one of NFC, NFKC, NFD, NFKD")
        self.form = form

    def process(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
        for doc in docs:
            # is_normalized is a fast check; most text is already NFC and needs no copy.
            if not unicodedata.is_normalized(self.form, doc.text):
                doc.text = unicodedata.normalize(self.form, doc.text)
            yield doc
