"""conf/prep.yaml's defaults run as written; the tokenizer's two input errors name the value and the fix."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.prep import run_prep
from data_prep.tokenizer import TokenizerConfig
from tests.conftest import REPO, small_prep_config, write_jsonl_zst


def _prep_cli() -> list[str]:
    script = Path(sys.executable).parent / "slimpajama-prep"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "data_prep.prep"]


def test_prep_yaml_defaults_run_as_written(demo_corpus, tmp_path):
    """`slimpajama-prep` with no overrides, from a directory holding data/demo_corpus (README's layout)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data/demo_corpus").symlink_to(demo_corpus)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_prep_cli(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "data/demo_shards/manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] > 0


def test_inputs_given_relative_to_the_current_directory_error_names_the_fix(demo_corpus, tmp_path, monkeypatch):
    """input_root=X with inputs=[X/train] looks in X/X/train: the error says so and gives inputs=[train]."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data/demo_corpus").symlink_to(demo_corpus)
    monkeypatch.chdir(tmp_path)
    cfg = small_prep_config(demo_corpus, tmp_path / "out", inputs=["data/demo_corpus/train"],
                            input_root="data/demo_corpus")
    with pytest.raises(FileNotFoundError) as e:
        run_prep(cfg)
    msg = str(e.value)
    assert "under input_root=data/demo_corpus" in msg and "use inputs=[train]" in msg and msg.count("\n") <= 1


def _tiny_corpus(root: Path, docs: int) -> Path:
    text = "the quick brown fox jumps over the lazy dog near the river bank at dawn "
    write_jsonl_zst(root / "train/a.jsonl.zst", [{"text": f"{text * 4} {i}", "meta": {"redpajama_set_name": "S"}}
                                                 for i in range(docs)])
    return root


def test_vocab_size_too_high_names_the_value_and_the_fix(tmp_path):
    corpus = _tiny_corpus(tmp_path / "corpus", 40)
    cfg = small_prep_config(corpus, tmp_path / "out", tokenizer=TokenizerConfig(vocab_size=8000, threads=1))
    with pytest.raises(ValueError) as e:
        run_prep(cfg)
    msg = str(e.value)
    assert msg.startswith("prep.tokenizer.vocab_size=8000: the training sample supports at most ")
    assert "set tokenizer.vocab_size=" in msg and msg.count("\n") <= 1 and "INTERNAL" not in msg


def test_no_training_text_names_the_inputs(tmp_path):
    """Every document read but none long enough to keep (an empty file is caught earlier, by the
    bad-input summary: test_bad_input.py)."""
    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    (corpus / "train/short.jsonl").write_text("".join(json.dumps({"text": f"too short {i}"}) + "\n" for i in range(5)))
    cfg = small_prep_config(corpus, tmp_path / "out", tokenizer=TokenizerConfig(vocab_size=300, threads=1))
    with pytest.raises(ValueError) as e:
        run_prep(cfg)
    msg = str(e.value)
    assert msg.startswith("no training text for the tokenizer: inputs=") and "train" in msg
    assert "yielded 0 documents after cleaning" in msg and msg.count("\n") <= 1
