"""What the shards hold: decoding every block in order gives the kept documents' ``encode(text) + [eos]``.

The expected stream is rebuilt here from the clean documents' text (``work/clean``), the split codes
(``work/split``, cross-checked against ``removed.jsonl`` and the holdout hash rule), the trained
tokenizer and the mixture's public functions, not from the ``tokens``/``plan`` files the shards
stage reads, so it checks ``plan.stream_tokens`` and ``plan.plan_split`` end to end.
"""
import io
import json
import tarfile

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

from data_prep.holdout import DUP, SPLITS, TRAIN, VAL
from data_prep.mixture import MixtureConfig, copies, mixture_draws, source_factors
from data_prep.prep import run_prep
from data_prep.stages import Context, read_clean
from data_prep.text_hash import hash_fraction
from tests.conftest import write_jsonl_zst
from tests.data_prep.test_pipeline import _cfg, synthetic_corpus


def _shard_blocks(path) -> list[np.ndarray]:
    """The samples of one shard, read with plain tarfile + numpy, in archive order."""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
        return [np.load(io.BytesIO(tf.extractfile(m).read()), allow_pickle=False) for m in members]


def _expected_stream(docs, factors, seed, eos) -> tuple[list[int], list[str]]:
    """Documents in order (key order), pass after pass for repeats; tokens and source per token."""
    by_source: dict[str, list[int]] = {}
    for k, (_, _doc_id, src, _ids) in enumerate(docs):
        by_source.setdefault(src, []).append(k)
    n = np.zeros(len(docs), np.int64)
    for src, idx in by_source.items():
        n[idx] = copies(
            mixture_draws([docs[k][1] for k in idx], seed), factors[src], [len(docs[k][3]) + 1 for k in idx]
        )
    toks: list[int] = []
    srcs: list[str] = []
    for p in range(int(n.max()) if len(n) else 0):
        for k in np.nonzero(n > p)[0]:
            ids = docs[k][3] + [eos]
            toks += ids
            srcs += [docs[k][2]] * len(ids)
    return toks, srcs


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_shard_blocks_are_the_kept_documents_in_stream_order(tmp_path, num_tasks):
    corpus = synthetic_corpus(tmp_path / "corpus")
    dups = [json.loads(line) for line in zstandard.ZstdDecompressor().decompress(
        (corpus / "train/chunk1/example_train_0.jsonl.zst").read_bytes()).decode().splitlines()[:3]]
    write_jsonl_zst(corpus / "train/chunk1/example_train_9.jsonl.zst", dups)  # exact duplicates, removed by dedup
    mixture = MixtureConfig(weights={"RedPajamaGithub": 2.0, "RedPajamaBook": 0.5})
    cfg = _cfg(corpus, tmp_path / "out", holdout_ratio=0.1, num_tasks=num_tasks, workers=1, samples_per_shard=20,
               shard_divisor=4, mixture=mixture)
    m = run_prep(cfg)
    ctx = Context(cfg)
    B, sps = m["block_size"], cfg.samples_per_shard
    sp = spm.SentencePieceProcessor(model_file=str(ctx.out / "tokenizer.model"))
    eos = sp.eos_id()
    assert eos == m["tokenizer"]["eos_id"]

    removed = {json.loads(line)["id"] for line in (ctx.out / "removed.jsonl").read_text().splitlines()}
    kept: dict[int, list] = {TRAIN: [], VAL: []}
    seen = 0
    for p in range(ctx.n):
        codes = np.load(ctx.work.split_codes(p))
        rows = list(read_clean(ctx.work.clean_part(p)))
        assert len(rows) == len(codes)
        for code, (key, doc) in zip(codes.tolist(), rows, strict=True):
            seen += 1
            # The split codes are what removed.jsonl and the holdout rule say (no eval files, distinct texts).
            if doc.id in removed:
                assert code == DUP
                continue
            assert code == (VAL if hash_fraction(doc.id) < cfg.holdout.ratio else TRAIN), doc.id
            kept[code].append((key, doc.id, doc.source, sp.encode(doc.text)))
    assert seen == 123 and len(removed) >= 3 and kept[TRAIN] and kept[VAL]

    for code, name in enumerate(SPLITS):
        docs = sorted(kept[code])  # stream order: input order (file, line), whatever the task that read it
        available: dict[str, int] = {}
        for _, _, src, ids in docs:
            available[src] = available.get(src, 0) + len(ids) + 1
        factors = source_factors(mixture, available) if code == TRAIN else {s: 1.0 for s in available}
        split = m["splits"][name]
        assert split["tokens_available"] == available
        assert split["mixture_factors"] == {s: round(f, 6) for s, f in sorted(factors.items())}
        if code == TRAIN:
            stream, sources = _expected_stream(docs, factors, mixture.seed, eos)
            total_blocks = len(stream) // B
            full = total_blocks // sps
            n_blocks = (full - full % cfg.shard_divisor) * sps
            assert len(split["shards"]) % cfg.shard_divisor == 0
            expected = [(stream[: n_blocks * B], sources[: n_blocks * B])]
        else:
            # validation: each source (sorted by name) is its own stream, cut into its own shards
            expected = []
            for src in sorted(available):
                part, _ = _expected_stream([d for d in docs if d[2] == src], {src: 1.0}, mixture.seed, eos)
                expected.append((part[: len(part) // B * B], [src] * (len(part) // B * B)))
            n_blocks = sum(len(toks) for toks, _ in expected) // B
            assert len(split["shards"]) == sum(-(-len(toks) // (B * sps)) for toks, _ in expected)
        assert split["samples"] == n_blocks > 0
        stream = [t for toks, _ in expected for t in toks]
        sources = [x for _, srcs in expected for x in srcs]

        got = []
        for s, entry in enumerate(split["shards"]):
            blocks = _shard_blocks(ctx.out / entry["name"])
            assert len(blocks) == entry["samples"] and all(b.shape == (B,) for b in blocks)
            lo, hi = len(got) * B, (len(got) + len(blocks)) * B
            per_source: dict[str, int] = {}
            for src in sources[lo:hi]:
                per_source[src] = per_source.get(src, 0) + 1
            assert entry["tokens_per_source"] == dict(sorted(per_source.items())), (name, s)
            if code == VAL:
                assert len(per_source) == 1  # a validation shard holds one source
            got += blocks
        assert len(got) == n_blocks
        assert np.concatenate(got).tolist() == stream, name

    # The mixture really repeats and subsamples, and shard_divisor really drops train blocks.
    train = m["splits"]["train"]
    assert train["mixture_factors"]["RedPajamaGithub"] == 2.0 and train["mixture_factors"]["RedPajamaBook"] == 0.5
    assert train["tail_tokens_dropped"] >= B
