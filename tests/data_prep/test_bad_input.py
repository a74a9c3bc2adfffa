"""Nothing silent: binary garbage under input names is summarized on the console and in the report,
and every good document still makes it through."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep.readers import JsonlReader
from data_prep.stats import PrepStats
from tests.conftest import REPO, write_jsonl_zst
from tests.data_prep.test_pipeline import WORDS


def _garbage(path, size=60_000, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def test_garbage_named_like_input_is_summarized_and_the_good_documents_survive(tmp_path):
    rng = np.random.default_rng(3)
    chunk = tmp_path / "corpus/train/chunk1"
    good = [{"text": " ".join(rng.choice(WORDS, 150)) + ".", "meta": {"redpajama_set_name": "RedPajamaC4"}}
            for _ in range(60)]
    write_jsonl_zst(chunk / "a_good.jsonl.zst", good[:30])
    (chunk / "b_good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good[30:]))
    for k, name in enumerate(("garbage.jsonl", "garbage.jsonl.zst", "garbage.parquet")):
        _garbage(chunk / name, seed=k)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.prep", "inputs=[train]", f"input_root={tmp_path / 'corpus'}",
         f"output_dir={out}", "seq_len=32", "samples_per_shard=40", "holdout.ratio=0.1", "dedup.enabled=false",
         "tokenizer.vocab_size=300", "tokenizer.threads=1", "run.num_tasks=2", "run.workers=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    console = proc.stdout
    # The console summary names each unreadable file and counts the bad input per kind.
    for name, kind in (("garbage.jsonl", "invalid_utf8"), ("garbage.jsonl.zst", "undecodable_file"),
                       ("garbage.parquet", "unreadable_parquet")):
        assert f"train/chunk1/{name}: no document read ({kind}" in console, console
    assert "3 of 5 files gave no document" in console
    report = json.loads((out / "prep_report.json").read_text())
    b = report["bad_input"]
    assert b["files_total"] == 3 and b["counts"]["undecodable_file"] == 1 and b["counts"]["unreadable_parquet"] == 1
    assert b["records"] == sum(b["counts"].values()) > 200  # every garbage line of the .jsonl is counted
    # Every good document made it through to the shards.
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["read"]["total"]["docs_out"] == 60
    assert steps["tokenize_train"]["total"]["docs_out"] + steps["tokenize_val"]["total"]["docs_out"] == 60
    # The Markdown lists 200 bad records and says how many more there are.
    md = (out / "prep_report.md").read_text()
    assert f"... and {b['records'] - 200:,} more (prep_report.json lists the first" in md
    assert "### Files no document was read from (3)" in md and "| unreadable_parquet | 1 |" in md


def test_every_input_unreadable_stops_with_the_summary(tmp_path):
    from data_prep.prep import run_prep
    from tests.conftest import small_prep_config

    corpus = tmp_path / "corpus"
    _garbage(corpus / "train/x.jsonl")
    _garbage(corpus / "train/y.parquet", seed=1)
    cfg = small_prep_config(corpus, tmp_path / "out", num_tasks=2, workers=1)
    with pytest.raises(RuntimeError, match=r"no document could be read from any of the 2 input files") as err:
        run_prep(cfg)
    assert "train/y.parquet: no document read (unreadable_parquet 1)" in str(err.value)
    assert not (tmp_path / "out/tokenizer.model").exists()


def test_bad_input_lists_are_capped_and_say_how_many_more(tmp_path):
    from data_prep.retention_report import bad_input, bad_input_lines, markdown
    from data_prep.stats import MAX_LISTED

    paths = [_garbage(tmp_path / f"g{k:02d}.jsonl", size=2000, seed=k) for k in range(12)]
    per_task = []
    for half in (paths[:6], paths[6:]):  # two tasks, merged as the report merges them
        stats = PrepStats()
        assert list(JsonlReader(half, tmp_path, stats=stats).run()) == []
        per_task.append(stats)
    merged = PrepStats()
    for s in per_task:
        merged.merge(PrepStats.from_dict(s.to_dict()))
    sd = merged.to_dict()
    assert sd["bad_files_total"] == 12 and [f["file"] for f in sd["bad_files"]] == [p.name for p in paths]
    summary = bad_input(sd, input_files=12)
    lines = bad_input_lines(summary, listed=5)
    assert "    ... and 7 more (see prep_report.md)" in lines
    assert lines[0].startswith(f"input: {sd['errors_total']:,} bad")
    # The bad-record list is bounded in memory, and the total is kept.
    stats = PrepStats()
    for i in range(MAX_LISTED + 50):
        stats.error("f.jsonl", i + 1, "invalid json")
    other = PrepStats.from_dict(stats.to_dict())
    other.merge(stats)
    assert len(other.errors) == MAX_LISTED and other.errors_total == 2 * (MAX_LISTED + 50)
    md = markdown(other, {"dedup": {"rate_by_source": {}}, "decontam": {}, "steps": [], "mixture": {}, "timings": {},
                          "stage_time": {}, "errors": other.errors, "skipped_files": [],
                          "bad_input": bad_input(other.to_dict())})
    assert f"... and {2 * (MAX_LISTED + 50) - 200:,} more" in md


def test_clean_input_says_so(tmp_path):
    from data_prep.retention_report import bad_input, bad_input_lines

    assert bad_input_lines(bad_input(PrepStats().to_dict(), input_files=4)) == [
        "input: no bad input (4 files read in full)"]


def test_bad_evaluation_file_error_says_how_many_more(tmp_path):
    from data_prep.decontam import eval_texts

    path = tmp_path / "eval.jsonl"
    path.write_text("{broken\n" * 7)
    with pytest.raises(ValueError, match=r"7 bad record\(s\): .*; \.\.\. and 2 more$"):
        eval_texts([str(path)])
