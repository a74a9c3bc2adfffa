"""normalize, short-document and quality filters (the holdout split: test_shards_content.py)."""
import unicodedata

import pytest

from data_prep.document import Document
from data_prep.filters import ShortDocumentFilter, slimpajama_clean_length
from data_prep.normalize import Normalize
from data_prep.stats import PrepStats


def doc(text, source="s", i=0):
    return Document(id=f"f:{i}", text=text, source=source)


def test_normalize_nfc():
    decomposed = "Cafe\u0301"
    out = list(Normalize().run([doc(decomposed)]))
    assert out[0].text == "Café" and unicodedata.is_normalized("NFC", out[0].text)


def test_normalize_rejects_unknown_form():
    with pytest.raises(ValueError, match="normalize.form"):
        Normalize("XYZ")


def test_clean_length_follows_slimpajama():
    # lowercase, punctuation removed, whitespace collapsed and stripped
    assert slimpajama_clean_length("  Hello,   World!!  \n\n") == len("hello world")


def test_short_filter_threshold_and_reasons():
    stats = PrepStats()
    long_text = "word " * 50  # 249 chars after cleaning
    padded_short = "a" * 150 + "!" * 100  # 250 raw chars, 150 after removing punctuation
    kept = list(ShortDocumentFilter(200, stats=stats).run([doc(long_text), doc("short"), doc(padded_short)]))
    assert [d.text for d in kept] == [long_text]
    step = stats.to_dict()["steps"][0]
    assert step["drop_reasons"] == {"shorter_than_200_chars": 2}
    assert step["total"]["docs_in"] == 3 and step["total"]["docs_out"] == 1
    assert list(ShortDocumentFilter(10).run([doc("short text here")]))  # configurable threshold


def test_ftfy_option_repairs_mojibake_and_is_timed():
    pytest.importorskip("ftfy")
    stats = PrepStats()
    out = list(Normalize("NFC", stats=stats, ftfy=True).run([doc("The Mona Lisa doesnâ€™t have eyebrows.")]))
    assert out[0].text == "The Mona Lisa doesn't have eyebrows."
    d = stats.to_dict()
    # A repaired text is counted as a note, not as a drop: docs in == docs out.
    step = d["steps"][0]
    assert step["notes"] == {"ftfy_changed": 1} and step["drop_reasons"] == {}
    assert step["total"]["docs_in"] == step["total"]["docs_out"] == 1 and d["timings"]["normalize"] > 0
    assert PrepStats.from_dict(d).to_dict()["steps"][0]["notes"] == {"ftfy_changed": 1}


def test_quality_filter_reasons():
    from data_prep.filters import QualityConfig, QualityFilter

    stats = PrepStats()
    good = "the cat sat on the mat and looked at the birds outside the window today " * 5
    docs = [
        doc(good),
        doc("too short here"),
        doc(good + "wow... " * 12),
        doc("\n".join(["same line repeated here again"] * 20)),
        doc(" ".join(["supercalifragilisticexpialidocious"] * 60)),
    ]
    kept = list(QualityFilter(QualityConfig(enabled=True), stats=stats).run(docs))
    assert [d.text for d in kept] == [good]
    assert stats.to_dict()["steps"][0]["drop_reasons"] == {
        "too_few_words": 1, "symbol_ratio": 1, "duplicate_lines": 1, "mean_word_length": 1}
    with pytest.raises(ValueError, match="min_words"):
        QualityConfig(min_words=10, max_words=5)


def test_short_filter_prefix_shortcut_agrees_with_full_cleaning():
    import random

    rnd = random.Random(0)
    alphabet = "ab ,.!?\n\t-" + "é"
    f = ShortDocumentFilter(200)
    for _ in range(400):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(150, 2500)))
        assert (f.drop_reason(doc(text)) is None) == (slimpajama_clean_length(text) >= 200)
