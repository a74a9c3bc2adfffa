"""Mixture semantics (total_tokens, max_epochs as a cap, allow_shortfall) and the shipped presets."""
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.mixture import MixtureConfig, copies, mixture_draws, source_factors
from data_prep.prep import run_prep
from data_prep.tokenizer import TokenizerConfig
from tests.conftest import REPO, small_prep_config, write_jsonl_zst

CC, C4, GH, BK, AX, WK, SE = ("RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaBook",
                              "RedPajamaArXiv", "RedPajamaWikipedia", "RedPajamaStackExchange")
# SlimPajama-DC data combinations: arXiv 2309.10818 Table 2 (arXiv 2504.12491 Appendix A / Table 3).
DC_TABLE = {
    "dc1": {CC: 1.0},
    "dc2": {CC: 0.909, GH: 0.091},
    "dc3": {CC: 0.758, GH: 0.242},
    "dc4": {CC: 0.758, WK: 0.242},
    "dc5": {CC: 0.758, GH: 0.091, BK: 0.079, WK: 0.073},
    "dc6": {CC: 0.522, C4: 0.267, GH: 0.052, BK: 0.042, AX: 0.046, WK: 0.038, SE: 0.033},
}
SLIMPAJAMA = {CC: 0.522, C4: 0.267, GH: 0.052, BK: 0.042, AX: 0.046, WK: 0.038, SE: 0.033}


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from data_prep.cli import conf_dir
    from data_prep.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="prep", overrides=list(overrides)))


def test_mixture_presets_match_the_paper_table():
    for name, table in {**DC_TABLE, "slimpajama": SLIMPAJAMA}.items():
        m = _compose(f"prep_mixture={name}").mixture
        assert m.preset == name and m.proportions == table and m.total_tokens is None and not m.weights
        assert sum(m.proportions.values()) == pytest.approx(1.0, abs=0.0015)  # table rounded to 0.1 %
        text = (REPO / f"conf/prep_mixture/{name}.yaml").read_text()
        assert "UNVERIFIED" not in text
        if name.startswith("dc"):
            assert "2309.10818" in text and "2504.12491" in text and "total_tokens=330e9" in text
    assert "UNVERIFIED" not in (REPO / "README.md").read_text()
    m = _compose("prep_mixture=dc3", "mixture.total_tokens=330e9", "mixture.allow_shortfall=true").mixture
    assert m.total_tokens == 330e9 and m.allow_shortfall


def test_mixture_natural_proportions_are_not_repeated():
    tokens = {s: int(p * 627e9) for s, p in SLIMPAJAMA.items()}
    m = _compose("prep_mixture=slimpajama").mixture
    assert source_factors(m, tokens) == {s: 1.0 for s in tokens}  # was 4.0 each (2.5T tokens from 627B)
    # DC-1 on all of SlimPajama: CommonCrawl once, everything else left out (was four epochs of CC).
    f = source_factors(_compose("prep_mixture=dc1").mixture, tokens)
    assert f[CC] == 1.0 and all(f[s] == 0 for s in tokens if s != CC)
    # No total: the scarcest source (relative to its target) is used once, the others subsampled.
    tokens = {"cc": 1000, "wiki": 100, "code": 400}
    f = source_factors(MixtureConfig(proportions={"cc": 0.5, "wiki": 0.25, "code": 0.25}), tokens)
    assert f == pytest.approx({"cc": 0.2, "wiki": 1.0, "code": 0.25})
    # The paper's budget with DC-3 on SlimPajama-sized sources: CC subsampled, GitHub upsampled.
    tokens = {CC: 333e9, GH: 36e9, WK: 24e9}
    f = source_factors(MixtureConfig(proportions=DC_TABLE["dc3"], total_tokens=330e9), tokens)
    assert f == pytest.approx({CC: 0.758 * 330 / 333, GH: 0.242 * 330 / 36, WK: 0.0})
    assert f[GH] > 2 and f[CC] < 1


def test_mixture_cap_error_names_source_tokens_and_factor(capsys):
    tokens = {"cc": 1000, "wiki": 100, "code": 400}
    cfg = dict(proportions={"cc": 0.5, "wiki": 0.25, "code": 0.25}, total_tokens=1000, max_epochs=2.0)
    with pytest.raises(ValueError, match=r"wiki: 100 tokens after dedup, the target of 250 needs factor 2\.5 "
                                         r"\(> max_epochs=2\).*total_tokens <= 800"):
        source_factors(MixtureConfig(**cfg), tokens)
    f = source_factors(MixtureConfig(**cfg, allow_shortfall=True), tokens)
    assert f == pytest.approx({"cc": 0.5, "wiki": 2.0, "code": 0.625})
    err = capsys.readouterr().err
    assert "shortfall of 50 tokens" in err and "wiki" in err and "2.5" in err
    assert source_factors(MixtureConfig(**{**cfg, "total_tokens": 800}), tokens) == pytest.approx(
        {"cc": 0.4, "wiki": 2.0, "code": 0.5})
    # Weights are capped the same way.
    with pytest.raises(ValueError, match=r"code: 400 tokens .* needs factor 5 \(> max_epochs=4\)"):
        source_factors(MixtureConfig(weights={"code": 5.0}), tokens)
    assert source_factors(MixtureConfig(weights={"code": 5.0}, allow_shortfall=True), tokens)["code"] == 4.0
    with pytest.raises(ValueError, match="needs mixture.proportions"):
        MixtureConfig(total_tokens=1e6)
    with pytest.raises(ValueError, match="max_epochs"):
        MixtureConfig(max_epochs=0.5)


def test_mixture_subsample_hits_the_token_target():
    rng = np.random.default_rng(0)
    ids = [f"d{i}" for i in range(3000)]
    tok = rng.integers(10, 5000, len(ids))
    for f in (0.3, 1.37, 2.9):
        c = copies(mixture_draws(ids, 1), f, tokens=tok)
        assert abs(int((c * tok).sum()) - f * tok.sum()) <= tok.max() / 2
        assert set(c.tolist()) == {int(f), int(f) + 1} and (copies(mixture_draws(ids, 1), f, tokens=tok) == c).all()
    assert (copies(mixture_draws(ids, 1), 1 - 1e-12, tokens=tok) == 1).all()


def _two_source_corpus(root: Path, cc_docs: int = 2400, gh_docs: int = 300, seed: int = 0) -> Path:
    words = ("river stone cloud paper garden window candle silver mountain harbor lantern meadow orchard "
             "thunder whisper velvet compass anchor feather glacier").split()
    rng = np.random.default_rng(seed)
    recs = [{"text": " ".join(rng.choice(words, int(rng.integers(40, 400)))) + ".", "meta": {"redpajama_set_name": s}}
            for s, n in ((CC, cc_docs), (GH, gh_docs)) for _ in range(n)]
    order = rng.permutation(len(recs))
    for f in range(3):
        write_jsonl_zst(root / f"train/chunk1/example_train_{f}.jsonl.zst", [recs[i] for i in order[f::3]])
    return root


def test_mixture_total_tokens_hits_dc3_targets(tmp_path):
    corpus = _two_source_corpus(tmp_path / "corpus")
    kw = dict(seq_len=32, samples_per_shard=512, holdout_ratio=0.0)
    first = run_prep(small_prep_config(corpus, tmp_path / "a", **kw,
                                       tokenizer=TokenizerConfig(vocab_size=300, max_sample_bytes=500_000, threads=1)))
    avail = first["splits"]["train"]["tokens_available"]
    assert avail[CC] > 6 * avail[GH]
    model = shutil.copy(tmp_path / "a/tokenizer.model", tmp_path / "fixed.model")  # same token counts again
    total = int(1.5 * avail[GH] / 0.242)  # GitHub 1.5x, CommonCrawl well under one epoch
    m = run_prep(
        small_prep_config(corpus, tmp_path / "b", **kw, tokenizer=TokenizerConfig(model_path=str(model)),
                          mixture=MixtureConfig(proportions=DC_TABLE["dc3"], total_tokens=total))
    )["splits"]["train"]
    assert m["tokens_available"] == avail
    f = m["mixture_factors"]
    assert f[GH] == pytest.approx(1.5, abs=1e-6) and 0.4 < f[CC] < 0.9
    print("realized", m["proportions"], "factors", f, "tokens", m["tokens"], "target", total)
    assert abs(m["proportions"][CC] - 0.758) < 0.005 and abs(m["proportions"][GH] - 0.242) < 0.005
    assert abs(m["tokens"] - total) < 0.005 * total
    for s, p in DC_TABLE["dc3"].items():  # each source within a document of its exact target
        assert abs(m["tokens_per_source"][s] - p * total) < 0.005 * total
