"""SentencePiece encoding of document batches, long documents piecewise (the ``tokenize`` stage).

The ``plan`` and ``shards`` stages in :mod:`data_prep.stages` join the encoded documents, each
followed by EOS, into one stream per split and cut it into blocks of ``seq_len + 1``.
"""
from __future__ import annotations

import sentencepiece as spm


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
    for t, i in zip(texts, ids, strict=True):
        if len(t) > max_chars:
            pieces = split_long(t, max_chars)
            i = list(sp.encode(pieces[0]))
            for prev, piece in zip(pieces, pieces[1:], strict=False):
                if prev.endswith("\n"):
                    j = sp.encode("\n" + piece)
                    if j[: len(nl)] == nl:
                        i.extend(j[len(nl) :])
                        continue
                i.extend(sp.encode(piece))
        out.append(i)
    return out
