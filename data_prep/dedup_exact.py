"""Exact deduplication by content hash, global across all sources."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from data_prep.document import Document, text_hash
from data_prep.stats import PrepStats
from data_prep.step import PipelineStep


class ExactDedup(PipelineStep):
    """Keep the first occurrence of each exact text (first in the sorted input order, so deterministic).

    Memory is 16 bytes of digest per unique document (plus set overhead); a corpus of 100M documents
    needs a few GB, which is why the fuzzy, sharded dedup of the data-prep issue exists for larger runs.
    """

    name = "exact_dedup"

    def __init__(self, stats: PrepStats | None = None) -> None:
        super().__init__(stats)
        self._seen: set[bytes] = set()

    def process(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
        for doc in docs:
            digest = text_hash(doc.text)
            if digest in self._seen:
                self.stats.drop(self.name, "exact_duplicate")
                continue
            self._seen.add(digest)
            yield doc
