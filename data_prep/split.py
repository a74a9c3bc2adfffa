"""Train/holdout split by a hash of the document id: stable under reordering, re-sharding and re-runs.

The id (``<relative file>:<line>``), not the text, decides, so two copies of one text can land on
different sides; the ``split`` stage then removes training documents whose normalized text hashes
like a holdout document (SlimPajama's decontamination of train against holdout).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from data_prep.document import Document, hash_fraction
from data_prep.stats import PrepStats
from data_prep.step import PipelineStep


class HashSplit(PipelineStep):
    """Mark documents ``val`` when their id's hash falls below ``holdout_ratio``; the rest stay ``train``.

    The ``split`` stage of the pipeline applies the same rule (plus ``holdout_count``) globally.
    """

    name = "split"

    def __init__(self, holdout_ratio: float, stats: PrepStats | None = None) -> None:
        super().__init__(stats)
        if not 0.0 <= holdout_ratio < 1.0:
            raise ValueError(f"prep.holdout_ratio={holdout_ratio}: must be in [0, 1)")
        self.holdout_ratio = holdout_ratio

    def process(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
        for doc in docs:
            doc.split = "val" if hash_fraction(doc.id) < self.holdout_ratio else "train"
            if doc.split == "val":
                # Reported as its own row so the retention table shows how much went to holdout.
                self.stats.add("holdout_val", doc.source, "out", 1, doc.nbytes)
            yield doc
