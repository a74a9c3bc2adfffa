"""Unicode normalization step (NFC by default; ftfy text repair as SlimPajama did, optionally)."""
from __future__ import annotations

import time
import unicodedata
from collections.abc import Iterable, Iterator

from data_prep.doc_pass import DocPass
from data_prep.document import Document
from data_prep.stats import PrepStats


class Normalize(DocPass):
    """Unicode normalization; with ``ftfy=True``, ``ftfy.fix_text(text, normalization=form)`` instead.

    SlimPajama ran ``ftfy.fix_text(normalization="NFC")``: it repairs mojibake but runs at a few MB/s,
    against ~1 GB/s for plain NFC, so it is off by default. The seconds spent are recorded in the
    report (``timings.normalize``) so its cost is visible.
    """

    name = "normalize"

    def __init__(self, form: str = "NFC", stats: PrepStats | None = None, ftfy: bool = False) -> None:
        super().__init__(stats)
        if form not in ("NFC", "NFKC", "NFD", "NFKD"):
            raise ValueError(f"prep.normalize.form={form!r}: expected one of NFC, NFKC, NFD, NFKD")
        self.form = form
        self.ftfy = ftfy
        if ftfy:
            import ftfy as _ftfy  # noqa: F401  (fail at construction, not mid-run, when it is missing)

    def process(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
        fix = None
        if self.ftfy:
            import ftfy

            fix = ftfy.fix_text
        for doc in docs:
            t0 = time.perf_counter()
            if fix is not None:
                fixed = fix(doc.text, normalization=self.form)
                if fixed != doc.text:
                    self.stats.note(self.name, "ftfy_changed")  # how many texts it touched (none are dropped)
                doc.text = fixed
            elif not unicodedata.is_normalized(self.form, doc.text):
                # is_normalized is a fast check; most text is already NFC and needs no copy.
                doc.text = unicodedata.normalize(self.form, doc.text)
            self.stats.add_time(self.name, time.perf_counter() - t0)
            yield doc
