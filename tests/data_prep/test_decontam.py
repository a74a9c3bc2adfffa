"""Evaluation-set decontamination: n-grams, short examples matched whole, too-short ones counted."""
import numpy as np
import pytest

from data_prep.config import DecontamConfig, PrepConfig
from data_prep.decontam import eval_ngrams
from data_prep.text_hash import word_hashes

FILLER = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _hits(ev, docs: list[str]) -> list[bool]:
    words, counts, _ = word_hashes(docs)
    return ev.contaminated(words, counts).tolist()


def _doc(*middle: str) -> str:
    return " ".join(FILLER[:6] + list(middle) + FILLER[6:])


def test_long_examples_match_by_ngram_only():
    example = [f"w{k}" for k in range(20)]
    ev = eval_ngrams([" ".join(example)], ngram=13, min_words=8)
    assert set(ev.hashes) == {13} and len(ev.hashes[13]) == 8 and ev.too_short == 0
    shares_13 = _doc(*example[3:16])
    shares_12 = _doc(*example[3:15])
    # Punctuation and case do not hide a match (the normalized words are compared).
    shouted = _doc(*[w.upper() + "," for w in example[:13]])
    assert _hits(ev, [shares_13, shares_12, shouted]) == [True, False, True]


def test_short_examples_are_matched_whole_and_shorter_ones_counted():
    ten = "what is the boiling point of water at sea level"  # 10 words: below 13, at least 8
    five = "name the capital of france"  # 5 words: below min_words
    ev = eval_ngrams([ten, five, "x " * 30], ngram=13, min_words=8)
    assert ev.examples == 3 and ev.too_short == 1 and sorted(ev.hashes) == [10, 13]
    docs = [
        _doc(*ten.upper().split()),  # the whole short example inside a longer document
        _doc(*ten.split()[:9]),  # only 9 of its 10 words
        _doc(*five.split()),  # too short to check: left alone
        ten + "?",  # a document that is exactly the example
    ]
    assert _hits(ev, docs) == [True, False, False, True]


def test_no_examples_and_bad_min_words():
    ev = eval_ngrams([], 13, 8)
    assert ev.examples == 0 and _hits(ev, ["a b c d e f g h i j k l m n"]) == [False]
    with pytest.raises(ValueError, match="decontam.min_words"):
        PrepConfig(decontam=DecontamConfig(min_words=14))
    assert np.array_equal(eval_ngrams(["a b c"], 13, 3).hashes[3], eval_ngrams(["A, b. C!"], 13, 3).hashes[3])


def test_eval_files_are_read_like_the_inputs(tmp_path):
    import gzip
    import json

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from data_prep.decontam import eval_texts

    (tmp_path / "arr.json").write_text(
        json.dumps([{"q": {"text": "first question"}}, {"q": {"text": "second question"}}], indent=2)
    )
    pq.write_table(pa.table({"q": [{"text": "parquet question"}]}), tmp_path / "p.parquet")
    (tmp_path / "l.JSONL.GZ").write_bytes(gzip.compress(b'{"q": {"text": "gz line"}}\n\n'))
    (tmp_path / "t.txt").write_text("plain one\n\nplain two\n")
    names = [str(tmp_path / n) for n in ("arr.json", "p.parquet", "l.JSONL.GZ", "t.txt")]
    assert eval_texts(names, "q.text") == ["first question", "second question", "parquet question", "gz line",
                                           "plain one", "plain two"]


def test_bad_eval_files_name_file_and_line(tmp_path):
    from data_prep.decontam import eval_texts

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "lone \\ud800"}\n{"nope": 1}\n')
    with pytest.raises(
        ValueError, match=r"2 bad record\(s\): .*bad.jsonl:2: lone surrogate.*bad.jsonl:3: field 'text'"
    ):
        eval_texts([str(bad)])
    (tmp_path / "cut.json").write_text('[{"text": "a"},\n{"text": ')
    with pytest.raises(ValueError, match=r"cut.json:2: invalid json array"):
        eval_texts([str(tmp_path / "cut.json")])
