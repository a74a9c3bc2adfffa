"""The benchmark scripts run and print their JSON contract (figures are checked by running them, not here)."""
import json
import subprocess
import sys

from tests.conftest import REPO


def _last_json(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_train_prints_ratio(demo_shards, tmp_path):
    out = _last_json([sys.executable, str(REPO / "benchmarks/bench_train.py"), "--data", str(demo_shards),
                      "--steps", "6", "--warmup", "2", "--dim", "64", "--layers", "2",
                      "--run-dir", str(tmp_path / "run")], tmp_path)
    assert {"trainer_tokens_s", "bare_loop_tokens_s", "ratio"} <= set(out)
    assert out["ratio"] == out["trainer_tokens_s"] / out["bare_loop_tokens_s"] > 0


def test_bench_mfu_cpu_smoke(tmp_path):
    out = _last_json([sys.executable, str(REPO / "benchmarks/bench_mfu.py"), "--device", "cpu", "--models", "tiny",
                      "--seq-len", "64", "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--precision", "fp32",
                      "--peak-tflops", "1"], tmp_path)
    row = out["rows"][0]
    assert row["model"] == "tiny" and 0 < row["mfu"] < 1 and row["tokens_s"] > 0
