"""A re-run sees its inputs: an added, removed, appended or rewritten file re-runs what depends on it and
everything after it, the log names the file, and the result equals a fresh run on the new inputs."""
import json
import os
from pathlib import Path

import numpy as np
import zstandard

from data_prep.config import RunConfig
from data_prep.prep import run_prep
from tests.conftest import write_jsonl_zst
from tests.data_prep.test_pipeline import WORDS, _cfg, synthetic_corpus

CHUNK = "train/chunk1"


def _records(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"text": " ".join(rng.choice(WORDS, 150)) + ".", "meta": {"redpajama_set_name": "RedPajamaBook"}}
            for _ in range(n)]


def _run(corpus: Path, out: Path, mode: str = "stat", force: bool = False) -> dict:
    cfg = _cfg(corpus, out, num_tasks=2, workers=1)
    cfg.run = RunConfig(num_tasks=2, workers=1, force=force, **({"input_fingerprint": mode} if mode != "stat" else {}))
    run_prep(cfg)
    return json.loads((out / "manifest.json").read_text())


def _markers(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "work/markers").rglob("*.json")}


def _check_rerun_equals_fresh(corpus: Path, out: Path, tmp_path: Path, capsys, mode: str = "stat") -> str:
    """Re-run in ``out``; it must redo every stage and equal a from-scratch run in another directory."""
    before = _markers(out)
    capsys.readouterr()
    again = _run(corpus, out, mode)
    log = capsys.readouterr().err
    after = _markers(out)
    assert all(after[k] != before[k] for k in before if "/report/" in k or "/plan/" in k)  # everything downstream
    fresh = _run(corpus, tmp_path / "fresh", mode, force=True)
    assert again["splits"] == fresh["splits"] and again["tokenizer"] == fresh["tokenizer"]
    return log


def test_unchanged_rerun_skips_every_task(tmp_path, capsys):
    corpus = synthetic_corpus(tmp_path / "corpus")
    _run(corpus, tmp_path / "out")
    before = _markers(tmp_path / "out")
    capsys.readouterr()
    _run(corpus, tmp_path / "out")
    assert _markers(tmp_path / "out") == before and "re-runs" not in capsys.readouterr().err


def test_added_file_reruns_everything_and_equals_a_fresh_run(tmp_path, capsys):
    corpus = synthetic_corpus(tmp_path / "corpus")
    first = _run(corpus, tmp_path / "out")
    # sorts between existing files: every later file's index (document keys) and task moves
    write_jsonl_zst(corpus / CHUNK / "example_train_1a.jsonl.zst", _records(30, 1))
    log = _check_rerun_equals_fresh(corpus, tmp_path / "out", tmp_path, capsys)
    assert f"clean task 0 re-runs: input file added: {CHUNK}/example_train_1a.jsonl.zst" in log
    assert "clean task 1 re-runs" in log
    assert json.loads((tmp_path / "out/manifest.json").read_text())["splits"] != first["splits"]


def test_removed_file_reruns_everything_and_equals_a_fresh_run(tmp_path, capsys):
    corpus = synthetic_corpus(tmp_path / "corpus")
    _run(corpus, tmp_path / "out")
    (corpus / CHUNK / "example_train_1.jsonl.zst").unlink()
    log = _check_rerun_equals_fresh(corpus, tmp_path / "out", tmp_path, capsys)
    assert f"clean task 0 re-runs: input file removed: {CHUNK}/example_train_1.jsonl.zst" in log


def test_appended_file_reruns_its_task_and_everything_after(tmp_path, capsys):
    corpus = synthetic_corpus(tmp_path / "corpus")
    _run(corpus, tmp_path / "out")
    f = corpus / CHUNK / "example_train_3.jsonl.zst"  # task 1's (files 1, 3)
    size = f.stat().st_size
    with open(f, "ab") as fh:  # a second zstd frame: more lines in the same file
        fh.write(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in _records(20, 2)).encode()))
    log = _check_rerun_equals_fresh(corpus, tmp_path / "out", tmp_path, capsys)
    assert f"clean task 1 re-runs: {corpus / CHUNK / 'example_train_3.jsonl.zst'} changed (size {size} -> " in log
    assert "clean task 0 re-runs" not in log  # its files did not change




def test_rewrite_same_size_and_mtime_is_seen_with_content_fingerprints(tmp_path, capsys):
    corpus = synthetic_corpus(tmp_path / "corpus")
    f = corpus / CHUNK / "example_train_0.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _records(20, 3)))
    _run(corpus, tmp_path / "out", "content")
    st = f.stat()
    text = f.read_text().replace("river", "RIVER")  # same bytes count, other text
    assert len(text.encode()) == st.st_size and text != f.read_text()
    f.write_text(text)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # a file system whose mtime says nothing happened
    log = _check_rerun_equals_fresh(corpus, tmp_path / "out", tmp_path, capsys, "content")
    assert f"clean task 0 re-runs: {f} changed (content changed)" in log


def test_changed_mtime_same_size_reruns_with_stat_fingerprints(tmp_path, capsys):
    corpus = synthetic_corpus(tmp_path / "corpus")
    f = corpus / CHUNK / "example_train_0.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _records(20, 3)))
    _run(corpus, tmp_path / "out")
    st = f.stat()
    f.write_text(f.read_text().replace("river", "RIVER"))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    log = _check_rerun_equals_fresh(corpus, tmp_path / "out", tmp_path, capsys)
    assert f"clean task 0 re-runs: {f} changed (modification time changed)" in log


def test_touched_file_reruns_its_clean_task_only(tmp_path, capsys):
    """Same bytes, newer mtime: the clean task re-runs, finds the same part, and nothing after it re-runs."""
    corpus = synthetic_corpus(tmp_path / "corpus")
    _run(corpus, tmp_path / "out")
    before = _markers(tmp_path / "out")
    f = corpus / CHUNK / "example_train_2.jsonl.zst"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    capsys.readouterr()
    _run(corpus, tmp_path / "out")
    assert "clean task 0 re-runs" in capsys.readouterr().err
    after = _markers(tmp_path / "out")
    assert [k for k in before if after[k] != before[k]] == ["work/markers/clean/00000-of-00002.json"]
