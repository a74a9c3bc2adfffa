"""The dedup normalization: SlimPajama's (punctuation deleted), shared by dedup, decontamination and the holdout."""
import re
import string

import numpy as np
import pytest

from data_prep.config import PrepConfig
from data_prep.decontam import eval_ngrams
from data_prep.dedup_core import DedupConfig, dedup_texts
from data_prep.stages import stage_hashes
from data_prep.text_hash import normalized_words, word_hashes


def slimpajama_words(text: str) -> list[str]:
    """SlimPajama's ``to_hash.py`` normalization, verbatim."""
    s = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", s.strip()).split()


def words(text: str, punctuation: str = "delete") -> list[str]:
    found = normalized_words(text) if punctuation == "delete" else normalized_words(text, punctuation)
    return [w.decode() for w in found]


def test_punctuation_is_deleted_as_slimpajama_deletes_it():
    assert words("Don't stop") == ["dont", "stop"]
    assert words("self.x = other.y;") == ["selfx", "othery"]
    assert words("e-mail: a@b.com (v2.0)") == ["email", "abcom", "v20"]
    # Unicode punctuation (category P*) is deleted too: a typographic apostrophe matches a typed one.
    typographic = "Don\u2019t \u201cquote\u201d \u00abguillemets\u00bb \u2014 yes\u2026 \u00bfQu\u00e9? \u3001\u3002"
    assert words(typographic) == ["dont", "quote", "guillemets", "yes", "qu\u00e9"]
    # Unicode symbols (S*), digits and letters stay.
    assert words("\u20ac5 \u00a9 x\u00b1y \u00dcber") == ["\u20ac5", "\u00a9", "x\u00b1y", "\u00fcber"]
    # Whitespace runs, Unicode ones included (no-break, ideographic, \x1c-\x1f), are one separator.
    assert words("  a \t\n\r\x0b\x0c b\u00a0\u00a0c\u3000d\u2003e\x1cf\u2028g  ") == list("abcdefg")
    # On ASCII text the words are exactly SlimPajama's.
    text = "It's 3 o'clock -- isn't it?\n\n  self.assertEqual(a[0], b_c)  #note\tend."
    assert words(text) == slimpajama_words(text)


def test_punctuation_space_is_a_named_option():
    assert words("Don't self.x \u2019a\u2019", "space") == ["don", "t", "self", "x", "a"]
    with pytest.raises(ValueError, match="prep.dedup.punctuation"):
        DedupConfig(punctuation="drop")


def test_word_hashes_follow_the_same_normalization():
    texts = ["don't stop", "dont stop", "Don\u2019t  stop!", "don t stop"]
    h, counts, digest = word_hashes(texts)
    assert counts.tolist() == [2, 2, 2, 3]
    assert h[0] == h[2] == h[4] and digest[0] == digest[1] == digest[2] != digest[3]  # the holdout's norm_digest
    _, counts, digest = word_hashes(texts, "space")
    assert counts.tolist() == [3, 2, 3, 3] and digest[0] == digest[2] == digest[3] != digest[1]


def _contraction_pair(seed: int = 0) -> tuple[str, str]:
    """A document with a contraction or dotted name every few words, and the copy that drops the marks."""
    rng = np.random.default_rng(seed)
    vocab = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 9))) for _ in range(5000)]
    marked = ["don't", "it's", "self.x", "can't", "os.path", "we're"]
    a, b = [], []
    for k in range(600):
        if k % 9 == 4:
            w = marked[rng.integers(0, len(marked))]
            a.append(w)
            b.append(w.replace("'", "").replace(".", ""))
        else:
            w = vocab[rng.integers(0, len(vocab))]
            a.append(w)
            b.append(w)
    return " ".join(a), " ".join(b)


def test_dedup_finds_copies_that_differ_only_in_punctuation():
    a, b = _contraction_pair()
    others = [_contraction_pair(seed)[0] for seed in (1, 2)]
    assert dedup_texts([a, b, *others], DedupConfig()) == {1}
    # Replacing punctuation by a space splits every contraction: the copy is no longer found.
    assert dedup_texts([a, b, *others], DedupConfig(punctuation="space")) == set()


def test_decontamination_uses_the_same_normalization():
    a, b = _contraction_pair()
    example = " ".join(a.split()[:40])  # an evaluation example with contractions, the copy typed without marks
    train_words, train_counts, _ = word_hashes([b, "unrelated words " * 20])
    assert eval_ngrams([example], 13, 8).contaminated(train_words, train_counts).tolist() == [True, False]
    curly = a.replace("'", "\u2019")
    train_words, train_counts, _ = word_hashes([curly])
    assert eval_ngrams([example], 13, 8).contaminated(train_words, train_counts).tolist() == [True]


def test_punctuation_enters_the_dedup_config_hash(tmp_path):
    base = PrepConfig(output_dir=str(tmp_path))
    other = PrepConfig(output_dir=str(tmp_path), dedup=DedupConfig(punctuation="space"))
    h0, h1 = stage_hashes(base), stage_hashes(other)
    assert h0["clean"] == h1["clean"] and h0["signatures"] != h1["signatures"] and h0["report"] != h1["report"]
