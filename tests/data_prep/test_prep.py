"""The whole prep pipeline on a small real corpus."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from data_prep.prep import run_prep
from data_prep.shard_format import RecordLayout, ShardReader
from tests.conftest import REPO, small_prep_config

SOURCES = {"RedPajamaGithub", "RedPajamaBook", "RedPajamaWikipedia", "RedPajamaCommonCrawl"}


def test_manifest_describes_the_shards(demo_shards):
    m = json.loads((demo_shards / "manifest.json").read_text())
    assert m["seq_len"] == 64 and m["block_size"] == 65 and m["dtype"] == "uint16"
    tok = m["tokenizer"]
    assert (tok["file"] == "tokenizer.model" and tok["vocab_size"] == 1000 and tok["eos_id"] == 2
            and len(tok["sha256"]) == 64)
    assert set(m["splits"]) == {"train", "val"} and m["splits"]["val"]["samples"] > 0
    train = m["splits"]["train"]
    assert set(train["tokens_per_source"]) == SOURCES
    assert sum(train["tokens_per_source"].values()) == train["tokens"] == train["samples"] * 65
    assert all(s["samples"] == 256 for s in train["shards"][:-1])
    assert m["totals"]["samples"] == train["samples"] + m["splits"]["val"]["samples"]
    assert m["prep_config"]["seq_len"] == 64 and m["prep_config_hash"]
    # every block holds valid ids and the documents are separated by EOS
    sp = spm.SentencePieceProcessor(model_file=str(demo_shards / "tokenizer.model"))
    sh = train["shards"][0]
    reader = ShardReader(demo_shards / sh["name"], 0, 65, np.dtype(np.uint16), RecordLayout(**m["record"]))
    block = np.concatenate([reader.read(i) for i in range(sh["samples"])])
    assert block.max() < sp.vocab_size() and (block == 2).any()


def test_stats_report_every_step_per_source(demo_shards):
    stats = json.loads((demo_shards / "prep_stats.json").read_text())
    steps = {s["step"]: s for s in stats["steps"]}
    assert {"read", "normalize", "short_filter", "exact_dedup", "split", "holdout_val", "tokenize_train",
            "tokenize_val"} <= set(steps)
    assert set(steps["read"]["per_source"]) == SOURCES
    f = steps["short_filter"]["total"]
    assert f["docs_in"] - f["docs_out"] == sum(steps["short_filter"]["drop_reasons"].values()) > 0
    # the license texts of installed distributions repeat (exactly or nearly, depending on what is
    # installed); both kinds of removal are reported per source
    cc = [steps[s]["per_source"]["RedPajamaCommonCrawl"] for s in ("exact_dedup", "fuzzy_dedup")]
    assert sum(c["docs_in"] - c.get("docs_out", 0) for c in cc) > 0
    assert "| exact_dedup |" in (demo_shards / "prep_report.md").read_text()


def test_rerun_skips_finished_stages_and_is_byte_identical(demo_corpus, demo_shards, tmp_path):
    out = tmp_path / "again"
    run_prep(small_prep_config(demo_corpus, out))
    names = sorted(p.name for p in demo_shards.glob("*.tar"))
    assert names == sorted(p.name for p in out.glob("*.tar"))
    for n in names + ["tokenizer.model"]:
        assert (out / n).read_bytes() == (demo_shards / n).read_bytes(), n
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    run_prep(small_prep_config(demo_corpus, out))  # all markers match: nothing is rewritten
    assert stamp == {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    run_prep(small_prep_config(demo_corpus, out, samples_per_shard=100))  # only the shard stage reruns
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["shards"][0]["samples"] == 100
    assert (out / "tokenizer.model").read_bytes() == (demo_shards / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("override, expected", [
    ("seq_lenn=3", "seq_lenn: no such key; did you mean seq_len?"),
    ("run.stage=nosuch", "run.stage=nosuch: expected 'all' or one of clean, signatures,"),
    ("seq_len=many", "seq_len: Value 'many' of type 'str' could not be converted to Integer"),
])
def test_prep_config_error_is_two_lines_naming_the_key(tmp_path, override, expected):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    cmd = [sys.executable, "-m", "data_prep.prep", override, f"output_dir={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 2, proc.stderr
    assert lines[0].startswith(f"slimpajama-prep: config error: {expected}"), lines
    assert lines[1] == "(set HYDRA_FULL_ERROR=1 for the traceback)"
    assert not (tmp_path / "out").exists()
