"""Shared fixtures: a small real corpus and its shards, built once per test session."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from data_prep.config import PrepConfig
from data_prep.demo_corpus import build_demo_corpus
from data_prep.prep import run_prep
from data_prep.tokenizer import TokenizerConfig

REPO = Path(__file__).resolve().parents[1]


def write_jsonl_zst(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(payload))
    return path


def small_prep_config(corpus: Path, out: Path, **overrides) -> PrepConfig:
    base = dict(
        inputs=[str(corpus / "train")],
        input_root=str(corpus),
        output_dir=str(out),
        seq_len=64,
        samples_per_shard=256,
        holdout_ratio=0.05,
        tokenizer=TokenizerConfig(vocab_size=1000, max_sample_bytes=2_000_000, threads=2),
    )
    base.update(overrides)
    return PrepConfig(**base)


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """The demo corpus capped at 400 kB per source: every source present, seconds to build."""
    out = tmp_path_factory.mktemp("demo_corpus")
    build_demo_corpus(out, max_bytes_per_source=400_000, docs_per_file=200)
    return out


@pytest.fixture(scope="session")
def demo_shards(demo_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_shards")
    run_prep(small_prep_config(demo_corpus, out))
    return out


def run_torchrun(nproc: int, overrides: list[str], cwd: Path, timeout: int = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Launch the trainer under torchrun with gloo on CPU; raise with its output when it fails."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "slimpajama_train.train", *overrides]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-8000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
