"""Base classes of the clean stage's document passes (read, normalize, each quality filter): a pass is a
generator over documents; a filter is a pass made of one predicate."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from data_prep.document import Document
from data_prep.stats import PrepStats


class DocPass:
    """One pass over a clean task's documents, and a row of the retention table (``name``).

    Subclasses implement :meth:`process`; :meth:`run` adds the per-source accounting, so every pass
    reports documents and bytes in/out without repeating that code.
    """

    name: str = "pass"

    def __init__(self, stats: PrepStats | None = None) -> None:
        self.stats = stats if stats is not None else PrepStats()

    def process(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
        raise NotImplementedError

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        counted_in = self.stats.count(self.name, docs, "in")
        yield from self.stats.count(self.name, self.process(counted_in, rank, world_size), "out")


class Filter(DocPass):
    """A step that keeps or drops each document; the base class counts every drop by reason."""

    def drop_reason(self, doc: Document) -> str | None:
        """Return why ``doc`` is dropped, or None to keep it."""
        raise NotImplementedError

    def process(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
        for doc in docs:
            reason = self.drop_reason(doc)
            if reason is None:
                yield doc
            else:
                self.stats.drop(self.name, reason)
