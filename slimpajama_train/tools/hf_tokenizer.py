"""Hugging Face tokenizer files that encode and decode exactly like the SentencePiece ``.model`` of training.

transformers' ``LlamaTokenizer`` (and v4's ``LlamaTokenizerFast``) builds its pipeline around a ``Metaspace``
pre-tokenizer, which leaves out the dummy-prefix ``▁`` when the text already starts with a space. SentencePiece always
adds it, so every text with leading spaces (indented code, centred license headers) got other ids than in training:
``"  two"`` is ``▁▁▁two`` to SentencePiece but ``▁▁two`` to ``Metaspace``. Here the ``.model``'s normalizer spec is
written out as plain normalizers in ``tokenizer.json``, and the folder names the generic ``PreTrainedTokenizerFast``
class, which loads that file as it is; a model-specific class would rebuild the pipeline and lose it.

Usage::

    write_hf_tokenizer(Path("tokenizer.model"), Path("exported/demo"), model_max_length=2048)
    AutoTokenizer.from_pretrained("exported/demo")(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Regex, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

Piece = sp_pb2.ModelProto.SentencePiece

# Texts the export checks before writing: what differed before (leading spaces, runs of spaces) and what a tokenizer
# easily gets wrong (empty text, byte fallback, CRLF, text that spells a special token).
PROBES: tuple[str, ...] = (
    "  two  spaces\n\nand newline",
    " leading space",
    "trailing spaces  ",
    "\t\tindented code\n\tx = 1\n",
    "    def f(x):\n        return x  # done\n",
    "",
    " ",
    "   ",
    "\n",
    "\n\nafter empty lines",
    "12345 + 0.5",
    "naïve café, 東京, 🤗\u200b",
    "a\r\nb\r\n",
    "▁ a literal ▁▁ meta symbol",
    "<s> </s> <unk> are text here",
)


def load_proto(model_file: Path) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def check_convertible(proto: sp_pb2.ModelProto) -> None:
    """Refuse ``.model`` options whose SentencePiece behaviour this conversion does not reproduce exactly."""
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if spec.model_type != sp_pb2.TrainerSpec.BPE:
        problems.append(f"model_type={sp_pb2.TrainerSpec.ModelType.Name(spec.model_type)} (only BPE)")
    if not spec.byte_fallback:
        problems.append("byte_fallback=false (unknown characters are not mapped the same way)")
    if spec.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix=true")
    if norm.precompiled_charsmap:
        # tokenizers' Precompiled normalizer works on grapheme clusters: "\r\n" became one space, not two.
        problems.append(f"normalization_rule_name={norm.name} (only identity)")
    if not norm.escape_whitespaces:
        problems.append("escape_whitespaces=false")
    if any(p.type in (Piece.USER_DEFINED, Piece.UNUSED) for p in proto.pieces):
        problems.append("user-defined or unused pieces")
    if problems:
        raise ValueError("cannot export this SentencePiece model as a Hugging Face tokenizer: " + "; ".join(problems))


def bpe_merges(proto: sp_pb2.ModelProto) -> list[tuple[str, str]]:
    """Every split of every normal piece into two normal pieces, best piece score first.

    SentencePiece's BPE merges any adjacent pair whose concatenation is a piece, highest score first, so a piece
    needs all its splits as merges, not only the one training made. Splits of one piece share its score, and
    where symbols ``a b c`` offer two of them (``a+b == b+c``) SentencePiece merges the left pair; ranking the
    shorter left part first does the same when ``len(a) < len(b)``. The other case never came up in the demo
    corpus nor in 220k fuzzed strings (runs of spaces, dashes, digits; random piece sequences).
    """
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == Piece.NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-score, i, k, left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def build_tokenizer(model_file: Path) -> Tokenizer:
    """A ``tokenizers`` BPE whose ids and decoded text equal ``SentencePieceProcessor(model_file)``'s."""
    proto = load_proto(model_file)
    check_convertible(proto)
    norm = proto.normalizer_spec
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # ignore_merges=False: the whole text is one word (no pre-tokenizer), and a text that happens to be a piece must
    # still be merged the way SentencePiece merges it.
    tok = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=proto.trainer_spec.unk_piece,
                        fuse_unk=True, byte_fallback=True, ignore_merges=False))
    # SentencePiece's normalizer, in its order. No pre-tokenizer: SentencePiece does not split the text into words
    # when encoding, and Metaspace would skip the dummy prefix before a leading space.
    steps = []
    if norm.remove_extra_whitespaces:
        # Only U+0020 counts; tabs and newlines stay.
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    steps.append(normalizers.Replace(" ", "▁"))
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))  # always, even before "▁"; not on empty text, like SentencePiece
    tok.normalizer = normalizers.Sequence(steps)
    # SentencePiece's decoder drops the dummy prefix: one leading "▁", or with remove_extra_whitespaces every "▁"
    # before the first other character (it keeps consuming while nothing is decoded yet).
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.remove_extra_whitespaces:
        steps.append(decoders.Strip(" ", 1 << 30, 0))
    elif norm.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    # Training encodes a document as sp.encode(text) + EOS, with no BOS; special tokens are added by the packer,
    # never by the tokenizer, so add_special_tokens adds nothing here.
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    specials = [proto.pieces[i].piece for i in sorted({vocab[proto.trainer_spec.unk_piece]} | {
        i for i, p in enumerate(proto.pieces) if p.type == Piece.CONTROL})]
    tok.add_special_tokens(specials)
    # Training tokenized "</s>" inside a document as plain text; so does this tokenizer.
    tok.encode_special_tokens = True
    return tok


def first_disagreement(tok: Tokenizer, sp: spm.SentencePieceProcessor, texts: Sequence[str]) -> str | None:
    """Describe the first text whose ids or decoded text differ between ``tok`` and ``sp``; None if all agree."""
    for text, enc in zip(texts, tok.encode_batch(list(texts), add_special_tokens=False), strict=True):
        want = sp.encode(text)
        if enc.ids != want:
            return f"{text[:60]!r}: ids {enc.ids[:12]} != SentencePiece {want[:12]}"
        if tok.decode(want, skip_special_tokens=False) != sp.decode(want):
            return f"{text[:60]!r}: decodes to {tok.decode(want)[:60]!r} != SentencePiece {sp.decode(want)[:60]!r}"
    return None


def write_hf_tokenizer(model_file: Path, out_dir: Path, model_max_length: int) -> None:
    """Write ``tokenizer.model``, ``tokenizer.json`` and ``tokenizer_config.json`` to ``out_dir``.

    Raises:
        ValueError: the ``.model`` uses an option this conversion does not reproduce, or the result disagrees with
            SentencePiece on one of ``PROBES``.
    """
    tok = build_tokenizer(model_file)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    if (problem := first_disagreement(tok, sp, PROBES)) is not None:
        raise ValueError(f"exported tokenizer would not encode like {model_file}: {problem}")
    shutil.copyfile(model_file, out_dir / "tokenizer.model")  # for sentencepiece users
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        # Generic class: it loads tokenizer.json as it is (LlamaTokenizer would swap in Metaspace).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        # legacy=True: v4's sentencepiece-backed LlamaTokenizer, if asked for by name, then calls sp.encode as is.
        "legacy": True,
        "bos_token": sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None,
        "eos_token": sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None,
        "unk_token": sp.id_to_piece(sp.unk_id()),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
