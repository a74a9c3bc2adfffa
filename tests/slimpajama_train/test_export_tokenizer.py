"""The exported Hugging Face tokenizer gives the ids training used, ``sp.encode(text)``, and decodes like it."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm

from data_prep.readers import DocumentReader, expand_inputs
from data_prep.tokenizer import TokenizerConfig, train_tokenizer
from slimpajama_train.model import ModelConfig
from slimpajama_train.tools.export import hf_config
from slimpajama_train.tools.hf_tokenizer import PROBES, build_tokenizer, first_disagreement, write_hf_tokenizer
from tests.helpers.built_once import built_once

# Beyond PROBES: long runs, lone control characters, and text that is exactly one piece.
EDGE_CASES = PROBES + (
    "\t",
    "\r\n",
    " \n ",
    "only\ttabs\t\t",
    " " * 100 + "x",
    "x" + " " * 37,
    "-" * 80 + "\n" + "=" * 33,
    "0" * 40,
    "the",
    "\x00\x1f\x7f",
    "mixed  \t \u3000 spaces\u00a0here",
)


@pytest.fixture(scope="module")
def texts(demo_corpus: Path) -> list[str]:
    """Every document of the demo corpus (code, licenses, prose, Unicode), then the edge cases."""
    docs = [doc.text for doc in DocumentReader(expand_inputs([str(demo_corpus)]), demo_corpus).run()]
    assert len(docs) > 500
    return docs + list(EDGE_CASES)


@pytest.fixture(scope="module", params=[1000, 8000], ids=["vocab1000", "vocab8000"])
def sp_model(request: pytest.FixtureRequest, texts: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer trained the way the pipeline trains one."""
    folder = built_once(tmp_path_factory, f"tokenizer_{request.param}", lambda folder: train_tokenizer(
        texts, TokenizerConfig(vocab_size=request.param, max_sample_bytes=2_000_000), folder / "tokenizer.model"))
    return folder / "tokenizer.model"


def export_folder(model_file: Path, out_dir: Path) -> Path:
    """Tokenizer files next to a Llama config.json, as slimpajama-export writes them (AutoTokenizer reads both)."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    cfg = ModelConfig(vocab_size=sp.vocab_size(), max_seq_len=256)
    out_dir.mkdir()
    special = {"bos_id": sp.bos_id(), "eos_id": sp.eos_id()}
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg, special)))
    write_hf_tokenizer(model_file, out_dir, model_max_length=cfg.max_seq_len)
    return out_dir


@pytest.mark.parametrize("use_fast", [True, False])
def test_auto_tokenizer_encodes_and_decodes_like_sentencepiece(sp_model, texts, tmp_path, use_fast):
    from transformers import AutoTokenizer

    out = export_folder(sp_model, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(out, use_fast=use_fast)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    bad_ids, bad_text = [], []
    for text in texts:
        want = sp.encode(text)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        # Training put no BOS before a document, so add_special_tokens (the default) adds nothing either.
        if ids != want or tok(text)["input_ids"] != want:
            bad_ids.append(text)
        # Compared with SentencePiece's own round trip: its normalizer may change text (not with our settings).
        if tok.decode(ids) != sp.decode(want):
            bad_text.append(text)
    assert not bad_ids, f"{len(bad_ids)}/{len(texts)} texts get other ids, first {bad_ids[0][:80]!r}"
    assert not bad_text, f"{len(bad_text)}/{len(texts)} texts decode differently, first {bad_text[0][:80]!r}"
    assert sp.decode(sp.encode("  two  spaces\n\nand newline")) == "  two  spaces\n\nand newline"
    # Generation: the EOS the model learned ends a document is the tokenizer's EOS, and it decodes away.
    assert (tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (sp.eos_id(), sp.bos_id(), sp.unk_id())
    assert tok.decode(sp.encode("done") + [sp.eos_id()], skip_special_tokens=True) == "done"


@pytest.mark.parametrize("spec", [
    {"remove_extra_whitespaces": True},
    {"add_dummy_prefix": False},
    {"add_dummy_prefix": False, "remove_extra_whitespaces": True},
], ids=["collapse-spaces", "no-dummy-prefix", "neither"])
def test_other_normalizer_settings_are_mirrored(texts, tmp_path, spec):
    """A ``.model`` brought in with ``prep.tokenizer.model_path`` may use other whitespace settings than ours."""
    model = train_with(texts, tmp_path, **spec)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert first_disagreement(build_tokenizer(model), sp, texts) is None


def test_export_refuses_a_normalization_it_cannot_reproduce(texts, tmp_path):
    model = train_with(texts[:50], tmp_path, normalization_rule_name="nmt_nfkc")
    with pytest.raises(ValueError, match="normalization_rule_name=nmt_nfkc"):
        write_hf_tokenizer(model, tmp_path, model_max_length=256)
    assert not (tmp_path / "tokenizer.json").exists()


def train_with(texts: list[str], tmp_path: Path, **overrides: object) -> Path:
    """Train a small BPE with the pipeline's options, except ``overrides``."""
    options = dict(model_type="bpe", vocab_size=1000, byte_fallback=True, split_digits=True,
                   allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                   normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    buf = io.BytesIO()
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=buf, **{**options, **overrides})
    out = tmp_path / "variant.model"
    out.write_bytes(buf.getvalue())
    return out
