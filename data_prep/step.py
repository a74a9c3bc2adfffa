"""Base classes for prep steps: a step is a generator over documents; a filter is one predicate."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from data_prep.document import Document
from data_prep.stats import PrepStats


class PipelineStep:
    """A stage of the data pipeline.

    Subclasses implement :meth:`process`; :meth:`run` adds the per-source accounting, so every step
    reports documents and bytes in/out without repeating that code.
    """

    name: str = "step"

    def __init__(self, stats: PrepStats | None = None) -> None:
        self.stats = stats if stats is not None else PrepStats()

    def process(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
        raise NotImplementedError

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        counted_in = self.stats.count(self.name, docs, "in")
        yield from self.stats.count(self.name, self.process(counted_in, rank, world_size), "out")


class Filter(PipelineStep):
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
