"""slimpajama-study: three mixtures of the demo corpus, shared prep work, same budget, the table."""
import json
import os
import re
import sys

import pytest

from slimpajama_train.tools.study import main, parse_mixtures
from tests.conftest import REPO

CODE = "code=RedPajamaGithub:0.85+RedPajamaBook:0.05+RedPajamaWikipedia:0.05+RedPajamaCommonCrawl:0.05"
PROSE = "prose=RedPajamaGithub:0.04+RedPajamaBook:0.48+RedPajamaWikipedia:0.44+RedPajamaCommonCrawl:0.04"


def _args(corpus, out) -> list[str]:
    prep = [f"inputs=[{corpus}/train]", f"input_root={corpus}", "holdout.ratio=0.2", "seq_len=64",
            "samples_per_shard=64", "tokenizer.vocab_size=1000", "tokenizer.max_sample_bytes=2000000",
            "tokenizer.threads=1"]
    train = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "backend.precision=fp32",
             "data.micro_batch_size=8", "data.num_workers=0", "trainer.global_batch_size=8", "trainer.max_steps=80",
             "trainer.eval_interval=80", "trainer.eval_batches=8", "trainer.log_interval=20", "optim.lr=3e-3",
             "optim.warmup_steps=5", "checkpoint.interval=0", "logger.wandb.enabled=false"]
    return ["--out", str(out), "--mixtures", f"none,{CODE},{PROSE}", *(f"--prep={p}" for p in prep),
            *(f"--train={t}" for t in train)]


@pytest.mark.slow
def test_three_mixture_study_on_the_demo_corpus(demo_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "study"
    main(_args(demo_corpus, out))
    result = json.loads((out / "study.json").read_text())
    rows = {r["mixture"]: r for r in result["mixtures"]}
    assert list(rows) == ["none", "code", "prose"]
    assert set(result["sources"]) >= {"RedPajamaGithub", "RedPajamaBook", "RedPajamaWikipedia"}
    github = {m: r["val_loss_by_source"]["RedPajamaGithub"] for m, r in rows.items()}
    book = {m: r["val_loss_by_source"]["RedPajamaBook"] for m, r in rows.items()}
    print("github val loss", github, "book val loss", book)
    # The expected direction: the code-heavy mix is best on code, the prose-heavy one on books.
    assert min(github, key=github.get) == "code"
    assert book["prose"] < book["code"]
    assert rows["code"]["train_proportions"]["RedPajamaGithub"] > 0.8
    assert all(r["step"] == 80 for r in rows.values())  # the same budget for every mixture
    md = (out / "study.md").read_text()
    assert "| mixture | val RedPajamaBook" in md and "| code |" in md and "**" in md
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "study.csv").is_file()
    # Mixture-independent work is done once: the mixtures' token ids and tokenizer are the shared
    # files themselves (hard links), and only plan/shards/report ran per mixture.
    shared = out / "data" / "_shared"
    for m in rows:
        tokens = out / "data" / m / "work/tokens/00000.bin"
        assert os.path.samefile(tokens, shared / "work/tokens/00000.bin")
        assert os.path.samefile(out / "data" / m / "tokenizer.model", shared / "tokenizer.model")
        val = json.loads((out / "data" / m / "manifest.json").read_text())["splits"]["val"]
        assert val == json.loads((shared / "manifest.json").read_text())["splits"]["val"]  # one holdout


def test_slurm_mode_submits_prep_train_and_table_with_dependencies(tmp_path, monkeypatch, capsys):
    log = tmp_path / "sbatch.log"
    fake = tmp_path / "sbatch"
    fake.write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\nn=$(wc -l < {log}); echo $((500 + n))\n')
    fake.chmod(0o755)
    monkeypatch.setenv("SBATCH", str(fake))
    monkeypatch.delenv("SBATCH_EXTRA", raising=False)
    main(["--slurm", *_args(tmp_path / "corpus", tmp_path / "study")])
    calls = log.read_text().splitlines()
    assert len(calls) == 5  # prep, three trainings, table
    assert "--job-name=study-prep" in calls[0] and "--phase prep" in calls[0]
    for call, name in zip(calls[1:4], ("none", "code", "prose"), strict=True):
        assert f"--job-name=study-{name}" in call and "--dependency=afterok:501" in call
        assert str(REPO / "launch/slurm/train.sbatch") in call and f"run_dir={tmp_path / 'study/runs' / name}" in call
    assert re.search(r"--dependency=afterok:502:503:504 .*--phase table", calls[4])
    assert "table: job 505" in capsys.readouterr().out


def test_mixture_specs_are_checked():
    ms = parse_mixtures("none,dc3,x=RedPajamaGithub:0.5+RedPajamaBook:0.5")
    assert [m.name for m in ms] == ["none", "dc3", "x"] and ms[2].proportions == {"RedPajamaGithub": 0.5,
                                                                                  "RedPajamaBook": 0.5}
    with pytest.raises(ValueError, match="not a prep_mixture preset"):
        parse_mixtures("nosuch")
    with pytest.raises(ValueError, match="source:fraction"):
        parse_mixtures("x=RedPajamaGithub")
    with pytest.raises(ValueError, match="distinct names"):
        parse_mixtures("none,none")
    assert sys.executable


def test_readme_study_example_prepares_every_mixture(demo_corpus, tmp_path, monkeypatch):
    """README's `slimpajama-study` command as written (its prep phase), from a directory holding
    data/demo_corpus, with small-corpus settings added."""
    from tests.data_prep.test_mixture_names import SMALL, readme_commands

    (commands,) = readme_commands("slimpajama-study")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/demo_corpus").symlink_to(demo_corpus)
    monkeypatch.chdir(tmp_path)
    main([*commands[1:], "--phase", "prep", *(f"--prep={o}" for o in SMALL)])
    names = [m.name for m in parse_mixtures(commands[commands.index("--mixtures") + 1])]
    assert names == ["none", "code", "prose"]
    out = tmp_path / commands[commands.index("--out") + 1]
    props = {n: json.loads((out / "data" / n / "manifest.json").read_text())["splits"]["train"]["proportions"]
             for n in names}
    assert props["code"]["RedPajamaGithub"] > 0.8 and props["prose"]["RedPajamaBook"] > 0.4
    # its --train overrides are a valid training config (the train phase itself is the test above)
    from tests.test_configs import _compose

    train = [commands[k + 1] for k, a in enumerate(commands) if a == "--train"]
    cfg = _compose("train", [*train, f"data.path={out / 'data/code'}"])
    assert cfg.trainer.max_steps == 200 and cfg.logger.wandb.enabled is False


def test_study_mixture_with_unknown_source_stops_before_any_mixture(demo_corpus, tmp_path, capsys):
    prep = [f"inputs=[{demo_corpus}/train]", f"input_root={demo_corpus}", "seq_len=64", "samples_per_shard=64",
            "tokenizer.vocab_size=1000", "tokenizer.max_sample_bytes=2000000", "tokenizer.threads=1"]
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--mixtures", "none,x=RedPajamaGithub:0.5+RedPajamaBooks:0.5", "--phase", "prep",
              *(f"--prep={p}" for p in prep)])
    msg = capsys.readouterr().err
    assert e.value.code == 1 and "\nslimpajama-study: error: --mixtures x:" in msg
    assert "--mixtures x: mixture.proportions.RedPajamaBooks: no such source, did you mean 'RedPajamaBook'?" in msg
    assert not (tmp_path / "data/none/manifest.json").exists()  # checked before the first mixture's shards


def test_study_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path / "s"), "--mixtures", "nosuchpreset"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1 and len(err) == 2, err
    assert err[0].startswith("slimpajama-study: error: --mixtures: 'nosuchpreset' is not a prep_mixture preset")
    with pytest.raises(ValueError, match="nosuchpreset"):
        main(["--out", str(tmp_path / "s"), "--mixtures", "nosuchpreset", "--debug"])
    assert not (tmp_path / "s").exists()
