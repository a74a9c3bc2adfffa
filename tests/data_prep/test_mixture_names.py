"""Every source a mixture names exists in the corpus, and the README's mixture and prep examples run as written."""
import json
import re
import shlex
import shutil

import pytest

from data_prep.mixture import MixtureConfig
from data_prep.prep import run_prep
from slimpajama_train.tools.study import compose_prep, link_shared_work
from tests.conftest import REPO, small_prep_config
from tests.helpers.built_once import built_once

README = (REPO / "README.md").read_text()
SMALL = ["seq_len=64", "samples_per_shard=64", "holdout.ratio=0.1", "tokenizer.vocab_size=1000",
         "tokenizer.max_sample_bytes=2000000", "tokenizer.threads=1"]
DEMO_SOURCES = ["RedPajamaBook", "RedPajamaCommonCrawl", "RedPajamaGithub", "RedPajamaWikipedia"]


def readme_commands(program: str) -> list[list[str]]:
    """The README's shell commands starting with ``program``, continuation lines joined, as argv lists."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith(program):
                out.append(shlex.split(line, comments=True))
    return out


def readme_mixture_overrides() -> list[str]:
    """Inline README examples that set a whole mixture dict, e.g. `mixture.weights={A: 2.0, B: 0.5}`."""
    return re.findall(r"`(mixture\.(?:weights|proportions)=\{[^`]*\})`", README)


@pytest.fixture(scope="module")
def shared_base(demo_corpus, tmp_path_factory):
    """The demo corpus prepared up to tokenization with a mixture-independent tokenizer (as the study does)."""
    base = built_once(tmp_path_factory, "mixture_names_base", lambda base: run_prep(compose_prep([
        f"inputs=[{demo_corpus}/train]", f"input_root={demo_corpus}", *SMALL, "tokenizer.sample_by_mixture=false",
        f"output_dir={base}"])))
    return demo_corpus, base


def _run_mixture(shared_base, target, *overrides: str) -> dict:
    corpus, base = shared_base
    link_shared_work(base, target)
    run_prep(compose_prep([f"inputs=[{corpus}/train]", f"input_root={corpus}", *SMALL,
                           "tokenizer.sample_by_mixture=false", f"output_dir={target}", *overrides]))
    return json.loads((target / "manifest.json").read_text())


def test_readme_mixture_examples_run_as_written(shared_base, tmp_path):
    examples = readme_mixture_overrides()
    assert any(e.startswith("mixture.weights=") for e in examples)
    assert any(e.startswith("mixture.proportions=") for e in examples)
    for k, example in enumerate(examples):
        m = _run_mixture(shared_base, tmp_path / str(k), example)
        named = set(re.findall(r"(RedPajama\w+):", example))
        assert named <= set(m["splits"]["train"]["proportions"]), example
        factors = json.loads((tmp_path / str(k) / "work/plan/train.json").read_text())["factors"]
        if example.startswith("mixture.weights="):
            for name, w in re.findall(r"(RedPajama\w+): ([\d.]+)", example):
                assert factors[name] == float(w), example


def test_readme_prep_commands_compose():
    """Every `python -m data_prep.prep` / `launch/slurm/prep.sh` line of the README is a valid config."""
    commands = readme_commands("python -m data_prep.prep") + readme_commands("launch/slurm/prep.sh")
    assert len(commands) >= 2
    for argv in commands:
        overrides = [a for a in argv[1:] if "=" in a]
        cfg = compose_prep(overrides)
        assert cfg.input_root == "/data/SlimPajama" and cfg.mixture.preset == "slimpajama", argv


@pytest.mark.parametrize("override, unknown, nearest", [
    ("mixture.proportions={RedPajamaGithub: 0.5, RedPajamaBooks: 0.5}", "proportions.RedPajamaBooks",
     "RedPajamaBook"),
    ("+mixture.weights.RedPajamaGitHub=2.0", "weights.RedPajamaGitHub", "RedPajamaGithub"),
    ("mixture.weights.RedPajamaGitHub=2.0", "weights.RedPajamaGitHub", "RedPajamaGithub"),
])
def test_misspelt_mixture_source_stops_the_run(shared_base, tmp_path, override, unknown, nearest):
    with pytest.raises(ValueError) as e:
        _run_mixture(shared_base, tmp_path / "x", override)
    msg = str(e.value)
    assert f"prep.mixture.{unknown}: no such source, did you mean {nearest!r}?" in msg
    assert "the corpus's sources are: " + ", ".join(DEMO_SOURCES) in msg and msg.count("\n") <= 1
    assert not (tmp_path / "x/manifest.json").exists()


def test_misspelt_source_stops_the_run_at_the_tokenizer_stage(demo_corpus, demo_shards, tmp_path):
    """By default the tokenizer sample follows the mixture: the name is checked there, before training."""
    out = tmp_path / "out"
    shutil.copytree(demo_shards, out)
    cfg = small_prep_config(demo_corpus, out, mixture=MixtureConfig(proportions={"RedPajamaGithub": 0.5,
                                                                                 "RedPajamaBooks": 0.5}))
    with pytest.raises(ValueError, match=r"RedPajamaBooks: no such source, did you mean 'RedPajamaBook'\?"):
        run_prep(cfg)
    # it stopped before training (a check only at the plan stage would have retrained it first)
    assert (out / "tokenizer.model").read_bytes() == (demo_shards / "tokenizer.model").read_bytes()


def test_preset_naming_absent_sources_stops_the_run(shared_base, tmp_path):
    with pytest.raises(ValueError) as e:
        _run_mixture(shared_base, tmp_path / "dc6", "prep_mixture=dc6")
    msg = str(e.value)
    assert "prep.mixture.proportions.RedPajamaC4: no such source" in msg and "(prep_mixture=dc6)" in msg
    assert "'~mixture.proportions.<name>'" in msg


def test_check_sources_names_nearest_and_list():
    from data_prep.mixture import check_sources

    check_sources(MixtureConfig(weights={"a": 2.0}), ["a", "b"])  # known names pass
    with pytest.raises(ValueError, match=r"prep.mixture.weights.zzz: no such source, no similar name\n"
                                         r"  the corpus's sources are: a, b;"):
        check_sources(MixtureConfig(weights={"zzz": 2.0}), ["b", "a"])
