"""Tokenize documents (SentencePiece, multi-threaded) and pack them into fixed blocks of ``seq_len + 1``."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from data_prep.document import Document


def tokenize(docs: Iterable[Document], model_file: str, batch_docs: int = 256, threads: int = 2) -> Iterator[tuple[Document, list[int]]]:
    """Yield ``(doc, ids)`` in input order; SentencePiece's own thread pool encodes each batch in parallel."""
    sp = spm.SentencePieceProcessor(model_file=model_file)
    batch: list[Document] = []

    def flush() -> Iterator[tuple[Document, list[int]]]:
        ids = sp.encode([d.text for d in batch], num_threads=threads)
        yield from zip(batch, ids)
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_docs:
            yield from flush()
    if batch:
        yield from flush()


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut a long text into pieces of at most ~``max_chars``, at line breaks where there are any.

    SentencePiece's encoder is superlinear on very long inputs without breaks; pieces keep every
    document's cost proportional to its length. Tokens at a cut may differ from encoding the whole.
    """
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            nl = text.rfind("\n", start + max_chars // 2, end)
            if nl != -1:
                end = nl + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def encode_texts(sp: spm.SentencePieceProcessor, texts: list[str], max_chars: int) -> list[list[int]]:
    """Encode a batch; long texts go piecewise and their ids are concatenated.

    A piece that starts after a line break is encoded as ``"\n" + piece`` and the ids of ``"\n"`` are
    stripped: the newline (a byte-fallback token, never merged) restores the context, so the ids equal
    those of the whole text instead of gaining a dummy-prefix ``▁`` at every cut.
    """
    out: list[list[int]] = []
    short = [t if len(t) <= max_chars else "" for t in texts]
    ids = sp.encode(short, num_threads=1)
    nl = sp.encode("\n")
    for t, i in zip(texts, ids):
        if len(t) > max_chars:
            pieces = split_long(t, max_chars)
            i = list(sp.encode(pieces[0]))
            for prev, piece in zip(pieces, pieces[1:]):
                if prev.endswith("\n"):
                    j = sp.encode("\n" + piece)
                    if j[: len(nl)] == nl:
                        i.extend(j[len(nl) :])
                        continue
                i.extend(sp.encode(piece))
        out.append(i)
    return out


class BlockPacker:
    """Concatenate documents, each followed by EOS, and cut the stream into blocks of ``block_size``.

    Blocks carry the per-source token counts the manifest reports. The tail shorter than one block
    is not emitted; :attr:`tail_tokens` says how many tokens that was.
    """

    def __init__(self, block_size: int, eos_id: int, dtype: np.dtype) -> None:
        self.block_size = block_size
        self.eos_id = eos_id
        self.dtype = dtype
        self._sources: list[str] = []
        self._source_ids: dict[str, int] = {}
        self._tok: list[np.ndarray] = []
        self._src: list[np.ndarray] = []
        self._buffered = 0
        self.tail_tokens = 0

    def _source_id(self, source: str) -> int:
        if source not in self._source_ids:
            self._source_ids[source] = len(self._sources)
            self._sources.append(source)
        return self._source_ids[source]

    def add(self, ids: list[int], source: str) -> Iterator[tuple[np.ndarray, dict[str, int]]]:
        arr = np.empty(len(ids) + 1, dtype=self.dtype)
        arr[:-1] = ids
        arr[-1] = self.eos_id
        self._tok.append(arr)
        self._src.append(np.full(len(arr), self._source_id(source), dtype=np.int32))
        self._buffered += len(arr)
        # Concatenate only once enough tokens for a few blocks are buffered: amortizes the copy.
        if self._buffered >= 4 * self.block_size:
            yield from self._emit()

    def _emit(self) -> Iterator[tuple[np.ndarray, dict[str, int]]]:
        tok = np.concatenate(self._tok)
        src = np.concatenate(self._src)
        n_blocks = len(tok) // self.block_size
        for b in range(n_blocks):
            sl = slice(b * self.block_size, (b + 1) * self.block_size)
            counts = np.bincount(src[sl], minlength=len(self._sources))
            yield tok[sl], {self._sources[i]: int(c) for i, c in enumerate(counts) if c}
        rest = n_blocks * self.block_size
        self._tok = [tok[rest:]]
        self._src = [src[rest:]]
        self._buffered = len(tok) - rest

    def finish(self) -> Iterator[tuple[np.ndarray, dict[str, int]]]:
        if self._tok:
            yield from self._emit()
        self.tail_tokens = self._buffered
        self._tok, self._src, self._buffered = [], [], 0
