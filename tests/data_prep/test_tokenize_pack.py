import argparse
import inspect
import json.decoder
import textwrap

import pytest
import sentencepiece as spm

from data_prep.pack import encode_texts
from data_prep.tokenizer import TokenizerConfig, obtain_tokenizer, tokenizer_info

TEXTS = [inspect.getsource(m) for m in (json.decoder, textwrap, argparse)] + [f"naïve café {i}" for i in range(50)]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return obtain_tokenizer(TokenizerConfig(vocab_size=400, threads=1), TEXTS, out, seed=0)


def test_trained_tokenizer_is_llama_like(model_file):
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    info = tokenizer_info(model_file)
    assert (info["unk_id"], info["bos_id"], info["eos_id"], info["vocab_size"]) == (0, 1, 2, 400)
    ids = sp.encode("x = 98765")
    pieces = [sp.id_to_piece(i) for i in ids]
    assert all(not (len(p.strip("▁")) > 1 and p.strip("▁").isdigit()) for p in pieces)  # split_digits
    # byte fallback: characters never seen still round-trip, no <unk>
    s = "日本語 😀\n\tx"
    assert sp.unk_id() not in sp.encode(s) and sp.decode(sp.encode(s)) == s


def test_training_is_deterministic(model_file, tmp_path):
    again = obtain_tokenizer(TokenizerConfig(vocab_size=400, threads=1), TEXTS, tmp_path / "t.model", seed=0)
    assert again.read_bytes() == model_file.read_bytes()


def test_load_existing_model(model_file, tmp_path):
    cfg = TokenizerConfig(model_path=str(model_file))
    copied = obtain_tokenizer(cfg, [], tmp_path / "tokenizer.model")
    assert copied.read_bytes() == model_file.read_bytes()
    with pytest.raises(FileNotFoundError, match="model_path"):
        obtain_tokenizer(TokenizerConfig(model_path=str(tmp_path / "missing.model")), [], tmp_path / "x.model")


def test_encode_texts_preserves_order(model_file):
    """The tokenize stage's batch encoder: one id list per text, in order, equal to ``sp.encode``."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    assert encode_texts(sp, TEXTS, 1024) == [sp.encode(t) for t in TEXTS]  # the module sources go piecewise


def test_weighted_reservoir_respects_cap_and_weights():
    from data_prep.text_hash import hash_fraction
    from data_prep.tokenizer import WeightedReservoir

    res = WeightedReservoir(cap_bytes=20_000)
    for i in range(2000):
        src = ("a", "b", "c")[i % 3]
        w = {"a": 4.0, "b": 1.0, "c": 0.0}[src]
        res.offer(hash_fraction(f"{i}"), w, i, f"{src}{i:05d} " + "x" * 94)
    texts = res.texts()
    assert res.bytes <= 20_000 and len(texts) == 20_000 // 101
    n = {s: sum(t.startswith(s) for t in texts) for s in "abc"}
    assert n["c"] == 0 and n["a"] > 2 * n["b"] > 0  # weight 4 is drawn far more often than weight 1
    assert texts == sorted(texts, key=lambda t: int(t[1:6]))  # input order, whatever the arrival order


def test_memory_estimate_lowers_the_sample_cap():
    from data_prep.tokenizer import sample_cap, trainer_memory_mb

    assert sample_cap(TokenizerConfig(max_sample_bytes=64_000_000)) == 64_000_000
    capped = sample_cap(TokenizerConfig(max_sample_bytes=64_000_000, max_memory_mb=300))
    assert capped < 64_000_000 and trainer_memory_mb(capped) <= 300
    with pytest.raises(ValueError, match="max_memory_mb"):
        sample_cap(TokenizerConfig(max_memory_mb=50))


def test_megabyte_documents_are_not_pathological(model_file):
    """SentencePiece's encode time grows faster than linearly with the length of one string, so a
    1 MB document must reach it in pieces: checked on what SentencePiece is handed (the longest
    string, deterministic), not on timings (which depend on the machine)."""
    import time

    from data_prep.pack import split_long

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    handed: list[int] = []

    class Spy:
        def encode(self, texts, *args, **kwargs):
            handed.extend(len(t) for t in ([texts] if isinstance(texts, str) else texts))
            return sp.encode(texts, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(sp, name)

    line = "def f(x):  return x * 2  # some code and prose mixed in, naïve café\n"
    small = [line * 40 for _ in range(400)]  # ~1 MB in 400 documents
    huge = [line * 16000]  # ~1 MB in one document
    t0 = time.perf_counter()
    encode_texts(sp, small, 65536)
    t_small = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = encode_texts(Spy(), huge, 65536)[0]
    t_huge = time.perf_counter() - t0
    print(f"1 MB as 400 documents {t_small:.3f} s, as one {t_huge:.3f} s; "
          f"{len(handed)} strings handed to SentencePiece, longest {max(handed)} chars")
    assert len(huge[0]) > 10**6 and len(handed) >= 16 and max(handed) <= 65536 + 1  # + the restoring newline
    assert ids == sp.encode(huge[0])  # cut at line breaks, the ids are those of the whole text
    pieces = split_long(huge[0], 65536)
    assert "".join(pieces) == huge[0] and all(len(p) <= 65536 for p in pieces) and all(p.endswith("\n") for p in pieces)
