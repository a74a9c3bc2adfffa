"""Decontamination: n-grams of user-supplied evaluation files, matched against training documents.

Evaluation files are jsonl (any supported compression, ``text_key`` field) or plain text (one
example per non-empty line). Their word n-grams are hashed exactly as the dedup shingles are
(normalized words, same window hash), so a training document is contaminated when it shares any
n-gram with an evaluation example (GPT-3 used 13-grams).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from data_prep.minhash_dedup import DedupConfig, shingle_hashes
from data_prep.readers import _lines, get_field


def eval_texts(files: Iterable[str], text_key: str = "text") -> list[str]:
    """Texts of the evaluation files; a bad line is an error naming file and line (eval data must be clean)."""
    texts: list[str] = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"prep.decontam.eval_files: {name!r} does not exist")
        if ".jsonl" in path.name or ".json." in path.name:
            for lineno, raw in enumerate(_lines(path), start=1):
                if not raw.strip():
                    continue
                try:
                    text = get_field(json.loads(raw), text_key)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ValueError(f"{name}:{lineno}: not a JSON object ({exc})") from exc
                if not isinstance(text, str):
                    raise ValueError(f"{name}:{lineno}: field {text_key!r} missing or not a string")
                texts.append(text)
        else:
            texts.extend(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return texts


def eval_ngrams(texts: list[str], ngram: int = 13) -> np.ndarray:
    """Sorted unique hashes of the word n-grams of ``texts``."""
    if not texts:
        return np.zeros(0, np.uint64)
    hashes, _, _ = shingle_hashes(texts, DedupConfig(shingle="word", ngram=ngram))
    return np.unique(hashes)
