"""The staged pipeline: task-count invariance, SLURM driver, markers, mixture, split, decontam, shards, report."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.config import PrepConfig
from data_prep.dedup_core import DedupConfig
from data_prep.filters import QualityConfig
from data_prep.mixture import MixtureConfig, copies, mixture_draws, source_factors
from data_prep.prep import run_prep, run_task
from data_prep.stages import STAGES
from data_prep.tokenizer import TokenizerConfig
from tests.conftest import REPO, small_prep_config, write_jsonl_zst

WORDS = ("river stone cloud paper garden window candle silver mountain harbor lantern meadow orchard "
         "thunder whisper velvet compass anchor feather glacier").split()


def synthetic_corpus(root: Path, docs_per_source: int = 40, files: int = 4, seed: int = 0) -> Path:
    """Small multi-source corpus of random prose (distinct documents), several files per chunk."""
    rng = np.random.default_rng(seed)
    recs = []
    for src in ("RedPajamaC4", "RedPajamaGithub", "RedPajamaBook"):
        for _ in range(docs_per_source):
            text = " ".join(rng.choice(WORDS, int(rng.integers(120, 260)))) + "."
            recs.append({"text": text, "meta": {"redpajama_set_name": src}})
    order = rng.permutation(len(recs))
    for f in range(files):
        write_jsonl_zst(root / f"train/chunk1/example_train_{f}.jsonl.zst", [recs[i] for i in order[f::files]])
    return root


def _cfg(corpus: Path, out: Path, **kw) -> PrepConfig:
    base = dict(seq_len=32, samples_per_shard=40, holdout_ratio=0.1,
                tokenizer=TokenizerConfig(vocab_size=300, max_sample_bytes=500_000, threads=1))
    base.update(kw)
    return small_prep_config(corpus, out, **base)


def _tars(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


def test_byte_identical_shards_for_1_and_3_tasks(demo_corpus, demo_shards, tmp_path):
    run_prep(small_prep_config(demo_corpus, tmp_path / "three", num_tasks=3, workers=2))
    one, three = _tars(demo_shards), _tars(tmp_path / "three")
    assert one.keys() == three.keys() and len(one) > 2
    assert all(one[k] == three[k] for k in one)
    m1 = json.loads((demo_shards / "manifest.json").read_text())
    m3 = json.loads((tmp_path / "three/manifest.json").read_text())
    assert m1["splits"] == m3["splits"] and m1["tokenizer"] == m3["tokenizer"]
    assert (demo_shards / "removed.jsonl").read_text() == (tmp_path / "three/removed.jsonl").read_text()
    markers = sorted(p.name for p in (tmp_path / "three/work/markers/signatures").iterdir())
    assert markers == [f"{i:05d}-of-00003.json" for i in range(3)]


def test_plain_webdataset_and_tar_read_the_shards(demo_shards):
    import webdataset as wds

    m = json.loads((demo_shards / "manifest.json").read_text())
    sh = m["splits"]["train"]["shards"][0]
    samples = list(wds.WebDataset(str(demo_shards / sh["name"]), shardshuffle=False).decode())
    assert len(samples) == sh["samples"] and samples[0]["tokens.npy"].shape == (m["block_size"],)
    names = subprocess.run(
        ["tar", "tf", str(demo_shards / sh["name"])], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(names) == sh["samples"]


def test_manifest_sha256_and_report(demo_shards):
    m = json.loads((demo_shards / "manifest.json").read_text())
    for split in m["splits"].values():
        for sh in split["shards"]:
            assert hashlib.sha256((demo_shards / sh["name"]).read_bytes()).hexdigest() == sh["sha256"]
            assert abs(sum(sh["proportions"].values()) - 1) < 1e-4
    assert abs(sum(m["splits"]["train"]["proportions"].values()) - 1) < 1e-4
    report = json.loads((demo_shards / "prep_report.json").read_text())
    assert {"exact_dedup", "fuzzy_dedup", "short_filter", "normalize"} <= set(report["retention"])
    assert report["dedup"]["rate_by_source"]["RedPajamaCommonCrawl"] > 0  # license texts are near-duplicates
    assert report["dedup"]["removed"] == len((demo_shards / "removed.jsonl").read_text().splitlines()) > 0
    assert "normalize" in report["timings"] and report["tokenizer"]["estimated_trainer_memory_mb"] > 0
    md = (demo_shards / "prep_report.md").read_text()
    assert "| fuzzy_dedup |" in md and "dedup rate" in md
    assert (demo_shards / "prep_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_slurm_driver_runs_every_stage_as_dependent_arrays(tmp_path):
    """launch/slurm/prep.sh with a stand-in ``sbatch`` that runs each array element of prep.sbatch."""
    corpus = synthetic_corpus(tmp_path / "corpus")
    log = tmp_path / "sbatch.log"
    fake = tmp_path / "sbatch"
    fake.write_text(f"""#!/usr/bin/env bash
set -euo pipefail
echo "$@" >> {log}
n=$(cat {tmp_path}/jobid 2>/dev/null || echo 100); echo $((n + 1)) > {tmp_path}/jobid
args=(); array=""
for a in "$@"; do
  case $a in --array=*) array=${{a#--array=}};; --*) ;; *) args+=("$a");; esac
done
for i in $(seq ${{array%-*}} ${{array#*-}}); do SLURM_ARRAY_TASK_ID=$i bash "${{args[@]}}" > /dev/null 2>&1; done
echo $((n + 1))
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "SBATCH": str(fake), "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    overrides = [f"inputs=[{corpus}/train/chunk*/example_train_*.jsonl.zst]", f"input_root={corpus}",
                 f"output_dir={out}", "seq_len=32", "samples_per_shard=40", "tokenizer.vocab_size=300",
                 "tokenizer.threads=1"]
    proc = subprocess.run(["bash", str(REPO / "launch/slurm/prep.sh"), "2", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = log.read_text().splitlines()
    assert len(calls) == len(STAGES)
    assert "--array=0-1" in calls[0] and "--dependency" not in calls[0] and " clean run.num_tasks=2" in calls[0]
    assert "--array=0-0" in calls[3] and "--dependency=afterok:103" in calls[3] and " components " in calls[3]
    assert "--mem-per-cpu=64G" in calls[3] and "--mem-per-cpu" not in calls[2]  # the big single-task stage
    assert "--array=0-1" in calls[4] and " removals " in calls[4]
    assert "--array=0-0" in calls[5] and " split " in calls[5]
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["samples"] > 0
    # the same config run locally as one pool gives the same shards
    local = _cfg(corpus, tmp_path / "local", num_tasks=2, holdout_ratio=0.02,
                 inputs=[f"{corpus}/train/chunk*/example_train_*.jsonl.zst"])
    run_prep(local)
    assert _tars(out) == _tars(tmp_path / "local")


def test_rerun_skips_finished_tasks_and_cli_runs_one_task(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus", docs_per_source=10, files=2)
    cfg = _cfg(corpus, tmp_path / "out", num_tasks=2)
    for stage in STAGES[:2]:
        for i in range(2):
            run_task(cfg, stage.name, i)
    marker = tmp_path / "out/work/markers/signatures/00001-of-00002.json"
    stamp = marker.stat().st_mtime_ns
    proc = subprocess.run([sys.executable, "-m", "data_prep.prep", "run.stage=signatures", "run.task_index=1",
                           "run.num_tasks=2",
                           f"inputs=[{corpus}/train]", f"input_root={corpus}", f"output_dir={tmp_path / 'out'}",
                           "seq_len=32", "samples_per_shard=40", "holdout.ratio=0.1", "tokenizer.vocab_size=300",
                           "tokenizer.max_sample_bytes=500000", "tokenizer.threads=1"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.stat().st_mtime_ns == stamp  # same config: the finished task was skipped
    with pytest.raises(RuntimeError, match="has not finished"):
        run_task(cfg, "report", 0)
    with pytest.raises(ValueError, match="task_index=2"):
        run_task(cfg, "clean", 2)
    assert not list((tmp_path / "out").rglob("*.tmp*"))


def test_bad_input_end_to_end_nothing_valid_lost(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus", docs_per_source=8, files=2)
    chunk = corpus / "train/chunk1"
    (chunk / "bad_json.jsonl").write_text('{"text": "x"\n')
    (chunk / "bad_utf8.jsonl").write_bytes(b'{"text": "\xff"}\n')
    (chunk / "no_text.jsonl").write_text('{"meta": {}}\n')
    (chunk / "empty.jsonl").write_text("")
    rng = np.random.default_rng(5)
    trunc = write_jsonl_zst(
        chunk / "trunc.jsonl.zst", [{"text": " ".join(rng.choice(WORDS, 60)), "meta": {}} for _ in range(800)]
    )
    trunc.write_bytes(trunc.read_bytes()[:-300])
    (chunk / "gone.jsonl").symlink_to(chunk / "missing.jsonl")
    cfg = _cfg(corpus, tmp_path / "out", inputs=[str(chunk / "*")], dedup=DedupConfig(enabled=False), num_tasks=2)
    run_prep(cfg)
    report = json.loads((tmp_path / "out/prep_report.json").read_text())
    reasons = report["error_counts"]["read"]
    assert reasons == {"invalid_json": 1, "invalid_utf8": 1, "missing_text": 1, "empty_file": 1, "truncated_file": 1,
                       "unreadable_file": 1}
    where = {(e["file"], e["line"]) for e in report["errors"]}
    assert {("train/chunk1/bad_json.jsonl", 1), ("train/chunk1/bad_utf8.jsonl", 1), ("train/chunk1/no_text.jsonl", 1),
            ("train/chunk1/empty.jsonl", None)} <= where
    steps = {s["step"]: s for s in report["steps"]}
    valid = 24 + steps["read"]["per_source"]["unknown"]["docs_out"]  # 24 synthetic + what the truncated file held
    assert steps["read"]["total"]["docs_out"] == valid
    kept = steps["tokenize_train"]["total"]["docs_out"] + steps["tokenize_val"]["total"]["docs_out"]
    assert 0 < steps["read"]["per_source"]["unknown"]["docs_out"] < 800
    assert kept == steps["short_filter"]["total"]["docs_out"] == valid  # no valid document lost


def test_mixture_weights_repeat_and_subsample_whole_documents(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus")
    base = _cfg(corpus, tmp_path / "base", holdout_ratio=0.0)
    mixed = _cfg(corpus, tmp_path / "mixed", holdout_ratio=0.0,
                 mixture=MixtureConfig(weights={"RedPajamaGithub": 2.0, "RedPajamaBook": 0.5}))
    m0 = run_prep(base)["splits"]["train"]
    m1 = run_prep(mixed)["splits"]["train"]
    avail = m1["tokens_available"]
    assert m1["mixture_factors"] == {"RedPajamaBook": 0.5, "RedPajamaC4": 1.0, "RedPajamaGithub": 2.0}
    # Whole repeats: exactly twice the tokens (up to the last partial block).
    assert abs(m1["tokens_per_source"]["RedPajamaGithub"] - 2 * avail["RedPajamaGithub"]) <= 64
    # Seeded subsample: about half (whole documents, so not exact), and the same every run.
    assert 0.25 < m1["tokens_per_source"]["RedPajamaBook"] / avail["RedPajamaBook"] < 0.75
    assert m0["tokens_per_source"]["RedPajamaC4"] == pytest.approx(m1["tokens_per_source"]["RedPajamaC4"], abs=64)
    assert len(m1["shards"]) > 1 and all("proportions" in s for s in m1["shards"])


def test_mixture_proportions_with_epoch_cap():
    tokens = {"cc": 1000, "wiki": 100, "code": 400}
    f = source_factors(MixtureConfig(proportions={"cc": 0.5, "wiki": 0.25, "code": 0.25}, max_epochs=2.0,
                                     total_tokens=800), tokens)
    # 800 tokens in all: cc 400 (0.4), wiki 200 (2.0, exactly the cap), code 200 (0.5)
    assert f == pytest.approx({"cc": 0.4, "wiki": 2.0, "code": 0.5})
    out = {s: tokens[s] * f[s] for s in tokens}
    assert out["cc"] / sum(out.values()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="wiki: 100 tokens"):  # 801 tokens would need wiki 2.004 times
        source_factors(MixtureConfig(proportions={"cc": 0.5, "wiki": 0.25, "code": 0.25}, max_epochs=2.0,
                                     total_tokens=801), tokens)
    f = source_factors(MixtureConfig(proportions={"cc": 1.0}), tokens)  # DC-1-like: other sources left out
    assert f["wiki"] == 0 and f["cc"] == 1.0  # no total: one epoch of the scarcest source, not max_epochs
    ids = [f"d{i}" for i in range(2000)]
    c = copies(mixture_draws(ids, 0), 1.3)
    assert (set(c.tolist()) == {1, 2} and 0.25 < (c == 2).mean() < 0.35
            and (copies(mixture_draws(ids, 0), 1.3) == c).all())
    with pytest.raises(ValueError, match="sum to"):
        MixtureConfig(proportions={"cc": 0.5})


def test_presets_compose():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from data_prep.cli import conf_dir
    from data_prep.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for name in ["slimpajama"] + [f"dc{i}" for i in range(1, 7)]:
            cfg = OmegaConf.to_object(compose(config_name="prep", overrides=[f"prep_mixture={name}"]))
            assert cfg.mixture.preset == name and abs(sum(cfg.mixture.proportions.values()) - 1) < 0.02
        assert OmegaConf.to_object(compose(config_name="prep", overrides=["prep_mixture=dc1"])).mixture.proportions == {
            "RedPajamaCommonCrawl": 1.0}


def test_holdout_count(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus", docs_per_source=20, files=2)
    run_prep(_cfg(corpus, tmp_path / "a", holdout_count=7, num_tasks=2))
    codes = np.concatenate([np.load(tmp_path / f"a/work/split/{i:05d}.npy") for i in range(2)])
    assert (codes == 1).sum() == 7
    m = json.loads((tmp_path / "a/manifest.json").read_text())
    assert m["splits"]["val"]["samples"] > 0


def test_hash_and_ngram_decontamination(tmp_path):
    from data_prep.stages import read_clean
    from data_prep.text_hash import hash_fraction

    corpus = synthetic_corpus(tmp_path / "corpus", docs_per_source=20, files=2)
    base = _cfg(corpus, tmp_path / "a", holdout_ratio=0.1, dedup=DedupConfig(enabled=False))
    run_prep(base)
    docs = [d for _, d in read_clean(tmp_path / "a/work/clean/part-00000.jsonl.zst")]
    val = [d for d in docs if hash_fraction(d.id) < 0.1]
    train = [d for d in docs if hash_fraction(d.id) >= 0.1]
    assert val and train
    # A copy of a holdout document, shouted and punctuated (same normalized text), in a file whose
    # line lands in train; and an evaluation set quoting 20 words of a training document.
    name = next(
        f"train/chunk1/copy_{k}.jsonl" for k in range(100) if hash_fraction(f"train/chunk1/copy_{k}.jsonl:1") >= 0.1
    )
    (corpus / name).write_text(
        json.dumps({"text": val[0].text.upper() + " !!!", "meta": {"redpajama_set_name": "RedPajamaC4"}}) + "\n"
    )
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"text": "Question: " + " ".join(train[3].text.split()[20:40]) + " ?"}) + "\n")
    run_prep(_cfg(corpus, tmp_path / "b", holdout_ratio=0.1, dedup=DedupConfig(enabled=False),
                  eval_files=[str(eval_file)]))
    report = json.loads((tmp_path / "b/prep_report.json").read_text())
    assert {s["step"]: s for s in report["steps"]}["decontam"]["drop_reasons"] == {
        "holdout_hash_match": 1, "eval_ngram_match": 1
    }
    assert report["decontam"] == {"eval_examples": 1, "eval_examples_too_short": 0, "ngram": 13, "min_words": 8}
    assert "## Decontamination" in (tmp_path / "b/prep_report.md").read_text()
    clean = [d.id for _, d in read_clean(tmp_path / "b/work/clean/part-00000.jsonl.zst")]
    codes = np.load(tmp_path / "b/work/split/00000.npy")
    assert codes[clean.index(name + ":1")] == -2 and codes[clean.index(train[3].id)] == -3


def _zst_lines(path):
    import zstandard

    return zstandard.ZstdDecompressor().decompress(path.read_bytes()).decode().splitlines()


def test_shard_divisor_and_quality_filter(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus")
    m = run_prep(_cfg(corpus, tmp_path / "out", shard_divisor=4, samples_per_shard=20, holdout_ratio=0.05,
                      quality=QualityConfig(enabled=True, min_words=150)))
    train = m["splits"]["train"]
    assert len(train["shards"]) % 4 == 0 and all(s["samples"] == 20 for s in train["shards"])
    assert train["tail_tokens_dropped"] >= 0
    steps = {s["step"]: s for s in json.loads((tmp_path / "out/prep_stats.json").read_text())["steps"]}
    assert steps["quality_filter"]["drop_reasons"].get("too_few_words", 0) > 0
    with pytest.raises(ValueError, match="shard_divisor"):
        run_prep(_cfg(corpus, tmp_path / "out2", shard_divisor=1000, samples_per_shard=20))


def test_stream_is_planned_once_and_shards_need_the_plan(tmp_path, monkeypatch):
    """The plan stage computes each split's stream once; shards tasks and the report only load it."""
    import data_prep.plan as plan_module
    from data_prep.plan import SplitPlan
    from data_prep.stages import Context

    corpus = synthetic_corpus(tmp_path / "corpus", docs_per_source=10, files=3)
    cfg = _cfg(corpus, tmp_path / "out", num_tasks=3, workers=1)
    calls = []
    real = plan_module.plan_split
    monkeypatch.setattr(plan_module, "plan_split",
                        lambda work, n, code, *a: calls.append(code) or real(work, n, code, *a))
    names = [s.name for s in STAGES]
    for stage in STAGES[: names.index("plan")]:
        for i in range(3 if stage.parallel else 1):
            run_task(cfg, stage.name, i)
    with pytest.raises(RuntimeError, match="stage 'plan' task 0 of 1 has not finished"):
        run_task(cfg, "shards", 0)
    run_prep(cfg)
    assert calls == [0, 1]  # train and val, once each, for 3 shards tasks and the report
    plan = SplitPlan.load(Context(cfg).work, "train")
    assert plan.shards == len(list((tmp_path / "out").glob("train-*.tar"))) and isinstance(plan.count, np.memmap)
