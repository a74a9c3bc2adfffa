"""Text normalization and hashing shared by dedup, decontamination, the holdout and the mixture.

Dedup shingles, decontamination n-grams and the holdout's normalized digests must hash the same
normalized words the same way, so all use :func:`word_hashes` (and :func:`window_hashes`) with the
one ``dedup.punctuation`` setting. Every hash here is a pure function of the text (no per-process
salt): outputs do not depend on the number of tasks or the machine.

The normalization (:func:`normalize_text`) is SlimPajama's ``to_hash.py``: lowercase, punctuation
deleted (``str.maketrans("", "", string.punctuation)``), whitespace runs collapsed, so ``don't`` is
the word ``dont`` and ``self.x`` the word ``selfx``. Beyond SlimPajama, Unicode punctuation (category
``P*``: ``’ “ ” « » – — … ¿ 、 。``) is deleted too, so a typographic ``don’t`` matches a typed
``don't``; Unicode symbols (``S*``: ``€ © ±``), digits and letters stay. Whitespace is every
character ``str.isspace()`` accepts (no-break and ideographic spaces too), as SlimPajama's ``\\s+``.
``dedup.punctuation=space`` replaces punctuation by a space instead (``don't`` -> ``don t``).
"""
from __future__ import annotations

import functools
import hashlib
import string
import unicodedata

import numpy as np

PUNCTUATION_MODES = ("delete", "space")
_ASCII_PUNCT = string.punctuation.encode()
# ASCII whitespace that bytes.split() does not split on (\x1c-\x1f are str.isspace()): to a space.
_ASCII_WS = "".join(chr(i) for i in range(128) if chr(i).isspace())
_SPACE_TABLES = {
    "delete": bytes(32 if chr(i) in _ASCII_WS else i for i in range(256)),
    "space": bytes(32 if chr(i) in _ASCII_WS or chr(i) in string.punctuation else i for i in range(256)),
}
POLY = np.uint64(0x100000001B3)  # FNV prime: odd, so the window hash below is a bijection per position
# Random 64-bit values for each byte, so character n-gram hashes are not linear in the raw bytes.
BYTE_TABLE = (np.random.default_rng(0x5EED).integers(0, 2**63, 256, dtype=np.uint64) * np.uint64(2)
              + np.uint64(1))


@functools.lru_cache(maxsize=1 << 16)
def _is_punct_or_space(c: str) -> tuple[bool, bool]:
    """(Unicode punctuation, whitespace) of one character (cached: a corpus uses few distinct ones)."""
    return unicodedata.category(c).startswith("P"), c.isspace()


def normalize_text(text: str, punctuation: str = "delete") -> bytes:
    """The normalized text as UTF-8 bytes: lowercase; ASCII and Unicode punctuation deleted
    (``punctuation="delete"``, the default) or replaced by a space (``"space"``); every whitespace
    character a space. Words are the runs of non-space bytes (the module docstring says why)."""
    if punctuation not in _SPACE_TABLES:
        raise ValueError(f"prep.dedup.punctuation={punctuation!r}: expected one of {', '.join(PUNCTUATION_MODES)}")
    s = text.lower()
    if not s.isascii():  # most documents are ASCII and skip this
        # One str.replace per distinct non-ASCII punctuation or space character (a fast scan each):
        # ~3x faster than a regex or str.translate over the whole text.
        sub = "" if punctuation == "delete" else " "
        for c in set(s):
            if c.isascii():
                continue
            is_punct, is_space = _is_punct_or_space(c)
            if is_punct or is_space:
                s = s.replace(c, " " if is_space else sub)
    raw = s.encode("utf-8")
    if punctuation == "delete":
        return raw.translate(_SPACE_TABLES["delete"], _ASCII_PUNCT)
    return raw.translate(_SPACE_TABLES["space"])


def normalized_words(text: str, punctuation: str = "delete") -> list[bytes]:
    """Words of the normalized text (:func:`normalize_text`) as UTF-8 bytes."""
    return normalize_text(text, punctuation).split()


def window_hashes(tokens: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every window of ``n`` consecutive tokens inside each document of a batch.

    ``tokens`` holds the documents' token hashes back to back, ``lengths`` their counts. A document
    shorter than ``n`` contributes one window over all its tokens. Returns (hashes, count per doc).
    Vectorized over the whole batch: ``n`` multiply-adds over one array instead of a loop per doc.
    """
    total = len(tokens)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    if total == 0:
        return np.zeros(0, np.uint64), np.zeros(len(lengths), np.int64)
    m = max(total - n + 1, 0)
    with np.errstate(over="ignore"):
        acc = tokens[:m].copy()
        for j in range(1, n):
            np.multiply(acc, POLY, out=acc)
            np.add(acc, tokens[j : j + m], out=acc)
    full = np.maximum(lengths - n + 1, 0)
    idx = np.repeat(starts[:-1] - np.concatenate(([0], np.cumsum(full)[:-1])), full) + np.arange(full.sum())
    out = [acc[idx]]
    counts = full.astype(np.int64)
    short = np.nonzero((lengths > 0) & (lengths < n))[0]
    if len(short):  # one shingle over the whole (short) document
        extra = np.empty(len(short), np.uint64)
        with np.errstate(over="ignore"):
            for k, d in enumerate(short):
                h = np.uint64(0)
                for t in tokens[starts[d] : starts[d + 1]]:
                    h = h * POLY + t
                extra[k] = h
        counts = counts.copy()
        counts[short] = 1
        # Re-interleave: per-document order is what the caller slices by.
        pieces, e, pos = [], 0, 0
        for d in range(len(lengths)):
            if lengths[d] >= n:
                pieces.append(out[0][pos : pos + full[d]])
                pos += full[d]
            elif lengths[d] > 0:
                pieces.append(extra[e : e + 1])
                e += 1
        out = [np.concatenate(pieces) if pieces else np.zeros(0, np.uint64)]
    return out[0], counts


_IS_SPACE = np.zeros(256, bool)
_IS_SPACE[list(b" \t\n\r\x0b\x0c")] = True


_POWER_CACHE: dict[int, np.ndarray] = {}


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """``base**t mod 2^64`` for t < n, cached (batches reuse them)."""
    cached = _POWER_CACHE.get(int(base))
    if cached is None or len(cached) < n:
        size = max(n, 1 << 12, 2 * len(cached) if cached is not None else 0)
        cached = np.empty(size, np.uint64)
        cached[0] = 1
        filled = 1
        with np.errstate(over="ignore"):  # wraps modulo 2^64, which is what we want
            while filled < size:  # doubling: base^(k+f) = base^k * base^f, one vector multiply per step
                step = min(filled, size - filled)
                cached[filled : filled + step] = cached[:step] * (cached[filled - 1] * base)
                filled += step
        _POWER_CACHE[int(base)] = cached
    return cached[:n]


def word_hashes(texts: list[str], punctuation: str = "delete") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hash every word of the normalized texts (:func:`normalize_text`) without creating a Python
    object per word.

    Returns (word hashes back to back, words per document, 64-bit digest of each document's normalized
    word sequence). A word's hash is ``sum_t T[byte_t] * P^t mod 2^64`` over its bytes (t counted
    from the word's start), with a random table ``T``, computed for all words of the batch at once
    with one ``reduceat`` (this replaces ``bytes.split`` + per-word hashing, the former bottleneck).
    Powers are needed only up to the longest word, so no table grows with the batch.
    """
    norm = [normalize_text(t, punctuation) for t in texts]
    doc_len = np.fromiter((len(b) + 1 for b in norm), dtype=np.int64, count=len(norm))
    arr = np.frombuffer(b" ".join(norm) + b" ", dtype=np.uint8)
    word = ~_IS_SPACE[arr]
    edges = np.diff(word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    doc_start = np.zeros(len(norm) + 1, np.int64)
    np.cumsum(doc_len, out=doc_start[1:])
    counts = np.diff(np.searchsorted(starts, doc_start))
    if len(starts) == 0:
        return np.zeros(0, np.uint64), counts, np.zeros(len(norm), np.uint64)
    lengths = ends - starts
    first_byte = np.zeros(len(lengths), np.int64)  # where each word starts among the word bytes
    np.cumsum(lengths[:-1], out=first_byte[1:])
    offset = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(first_byte, lengths)
    with np.errstate(over="ignore"):
        vals = BYTE_TABLE[arr[word]] * _powers(POLY, int(lengths.max()))[offset]
        h = np.add.reduceat(vals, first_byte)
        h ^= h >> np.uint64(31)  # spread the high bits into the low ones rensa's permutations read
        # Order-sensitive digest of each document's word sequence (decontamination by hash).
        first = np.zeros(len(counts), np.int64)
        np.cumsum(counts[:-1], out=first[1:])
        pos = np.arange(len(h)) - np.repeat(first, counts)
        weighted = h * _powers(POLY, int(counts.max()))[pos]
        digest = np.zeros(len(counts), np.uint64)
        nz = counts > 0
        digest[nz] = np.add.reduceat(weighted, first[nz])
    return h, counts, digest


def content_digest(text: str) -> int:
    """64-bit content hash (exact duplicates share it)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def text_hash(text: str) -> bytes:
    """A 16-byte content digest; blake2b is ~3x faster than sha256 here and collision-safe at corpus scale."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def hash_fraction(text: str) -> float:
    """Map a string to a uniform number in [0, 1) through its content hash (seeded subsamples, splits)."""
    return int.from_bytes(text_hash(text)[:8], "big") / 2**64
