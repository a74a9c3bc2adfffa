import numpy as np
import pytest
import sentencepiece as spm

from data_prep.document import Document
from data_prep.pack import BlockPacker, tokenize
from data_prep.tokenizer import TokenizerConfig, obtain_tokenizer, tokenizer_info

import inspect
import json.decoder
import textwrap
import argparse

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


def test_tokenize_preserves_order(model_file):
    docs = [Document(f"f:{i}", t, "s") for i, t in enumerate(TEXTS[:50])]
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    out = list(tokenize(docs, str(model_file), batch_docs=7, threads=2))
    assert [d.id for d, _ in out] == [d.id for d in docs]
    assert all(ids == sp.encode(d.text) for d, ids in out)


def test_packer_joins_with_eos_and_counts_sources():
    packer = BlockPacker(block_size=5, eos_id=2, dtype=np.dtype(np.uint16))
    blocks = []
    for ids, src in [([10, 11, 12], "a"), ([20, 21, 22, 23, 24, 25], "b"), ([30], "a")]:
        blocks += list(packer.add(ids, src))
    blocks += list(packer.finish())
    stream = [10, 11, 12, 2, 20, 21, 22, 23, 24, 25, 2, 30, 2]
    assert [b.tolist() for b, _ in blocks] == [stream[0:5], stream[5:10]]
    assert blocks[0][1] == {"a": 4, "b": 1} and blocks[1][1] == {"b": 5}
    assert packer.tail_tokens == 3
