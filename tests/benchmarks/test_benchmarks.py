"""The benchmark scripts run and print their JSON contract (figures are checked by running them, not here)."""
import json
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch

from benchmarks import bench_mfu, bench_nccl, bench_train, gpu_check
from tests.conftest import REPO


def _last_json(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bench_train_prints_the_median_ratio_of_alternating_pairs(demo_shards, tmp_path):
    out = _last_json([sys.executable, str(REPO / "benchmarks/bench_train.py"), "--data", str(demo_shards),
                      "--steps", "6", "--warmup", "2", "--repeats", "3", "--dim", "64", "--layers", "2",
                      "--device", "cpu", "--run-dir", str(tmp_path / "run")], tmp_path)
    trainer, bare = out["trainer_runs_tokens_s"], out["bare_runs_tokens_s"]
    assert len(trainer) == len(bare) == out["repeats"] == 3
    assert out["ratios"] == pytest.approx([t / b for t, b in zip(trainer, bare, strict=True)])
    assert out["ratio"] == sorted(out["ratios"])[1] and out["ratio_min"] <= out["ratio"] <= out["ratio_max"]
    assert out["trainer_tokens_s"] == sorted(trainer)[1] and out["bare_loop_tokens_s"] == sorted(bare)[1]
    # the bare loop runs the trainer's kernels: its chunked loss and fused AdamW
    assert out["loss_chunk_tokens"] > 0 and out["fused_adamw"] and out["compile"] is False
    assert out["precision"] == "fp32" and out["device"].startswith("cpu")


def test_bench_train_on_synthetic_shards_as_gpu_check_runs_it(tmp_path):
    """The command gpu_check builds (``--cpu``: the same script and flags, tiny sizes), on synthetic shards."""
    cmd, env = gpu_check.part_command("bench_train", gpu_check.parse_args(["--cpu"]), 0, tmp_path)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ratio"] > 0 and out["seq_len"] == 64


def test_synthetic_shards_read_back_through_the_trainers_loader(tmp_path):
    from slimpajama_train.data.dataset import DataConfig, TokenBlocks, check_manifest, open_dataset

    path = bench_train.write_synthetic_shards(tmp_path / "s", vocab_size=1000, seq_len=32, train_samples=300,
                                              val_samples=20, samples_per_shard=128)
    manifest, data_dir = open_dataset(DataConfig(path=str(path)))
    check_manifest(manifest, data_dir, 32, 1000, None)
    assert [len(s["shards"]) for s in manifest["splits"].values()] == [3, 1]
    ds = TokenBlocks(data_dir, manifest, "train", seed=0, shuffle=False)
    expected = bench_train.synthetic_tokens(300, 33, 1000, 0)
    for pos in (0, 127, 128, 299):
        item = ds[pos]
        np.testing.assert_array_equal(np.asarray(item[0] if isinstance(item, tuple) else item), expected[pos])
    follows = (expected[:, 1:] == (expected[:, :-1] + 1) % 1000).mean()
    assert 0.45 < follows < 0.6  # the learnable +1 rule holds for about half the tokens
    # The same parameters reuse the files; the dataset is byte-identical when rebuilt.
    mtime = (path / "manifest.json").stat().st_mtime_ns
    bench_train.write_synthetic_shards(tmp_path / "s", vocab_size=1000, seq_len=32, train_samples=300,
                                       val_samples=20, samples_per_shard=128)
    assert (path / "manifest.json").stat().st_mtime_ns == mtime


def test_bench_mfu_cpu_smoke_real_sharded_path(tmp_path):
    """bench_mfu as gpu_check runs it with ``--cpu``: FSDP2 always_shard on a gloo group of one."""
    cmd, env = gpu_check.part_command("mfu", gpu_check.parse_args(["--cpu"]), 0, tmp_path)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    out, row = lines[-1], lines[-1]["rows"][0]
    assert lines[0] == {"row": row}  # each model's row is printed as it finishes (kept on a timeout)
    assert row["model"] == "tiny" and row["always_shard"] and row["gpus"] == 1 and row["steps"] == 3
    assert 0 < row["mfu_megatron"] <= row["mfu_palm"] < 1
    assert row["step_time_min_s"] <= row["step_time_median_s"] <= row["step_time_max_s"]
    assert row["tokens_s_per_gpu"] == pytest.approx(row["micro_batch"] * row["seq_len"] / row["step_time_median_s"])
    assert out["gpus"] == 1 and out["device"] == "cpu"


def test_flop_conventions():
    from slimpajama_train.mfu import flops_per_token

    cfg = bench_mfu.model_config("125m", 32000, 2048)
    f = bench_mfu.flops_per_token_conventions(cfg, 2048)
    assert f["palm"] == flops_per_token(cfg, 2048)  # the trainer's MFU is PaLM's convention
    assert f["palm"] - f["megatron"] == 6 * cfg.n_layers * cfg.dim * 2048  # attention halved
    assert bench_mfu.mfu(1000.0, f["palm"], 989.0) == pytest.approx(1000 * f["palm"] / 989e12)
    assert bench_mfu.mfu(1000.0, f["palm"], None) is None


def test_bench_mfu_records_out_of_memory_and_goes_on(monkeypatch):
    def oom(name, a, dist_info):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 27.00 GiB\nmore")

    monkeypatch.setattr(bench_mfu, "measure", oom)
    assert bench_mfu.run_model("7b", Namespace(), None) == {
        "model": "7b", "skipped": "out of memory: CUDA out of memory. Tried to allocate 27.00 GiB"}

    def broken(name, a, dist_info):
        raise ValueError("a real bug")

    monkeypatch.setattr(bench_mfu, "measure", broken)
    with pytest.raises(ValueError, match="a real bug"):
        bench_mfu.run_model("125m", Namespace(), None)


def test_bench_mfu_train_step_adapts_to_the_backend_signature():
    calls = []

    class NewBackend:
        def forward_backward(self, batch, last_micro):
            calls.append(("new", tuple(batch.shape)))

        def step(self, lr):
            calls.append(("step", lr))

    class OldBackend(NewBackend):
        def forward_backward(self, inputs, targets, last_micro):
            calls.append(("old", tuple(inputs.shape), tuple(targets.shape)))

    tokens = torch.zeros(2, 9, dtype=torch.long)
    bench_mfu.train_step(NewBackend(), tokens, 0.1)
    bench_mfu.train_step(OldBackend(), tokens, 0.2)
    assert calls == [("new", (2, 9)), ("step", 0.1), ("old", (2, 8), (2, 8)), ("step", 0.2)]


def test_bench_mfu_large_model_settings_and_torchrun_argv():
    a = bench_mfu.parse_args([])
    assert a.models == ["125m", "350m", "1.3b", "7b"] and a.steps == 50 and a.warmup == 10 and not a.compile
    assert a.large_models == ["7b"] and a.large_micro_batch == 1 and a.large_ac == "full"
    assert bench_mfu.parse_args(["--compile", "--ac", "op", "--loss-chunk-tokens", "0"]).compile
    argv = bench_mfu.torchrun_argv(4, "x.py", ["--nproc", "4", "--models", "tiny", "--nproc=4"])
    assert argv[-4:] == ["--nproc-per-node=4", "x.py", "--models", "tiny"]


@pytest.mark.parametrize("nbytes,seconds,world,algbw,busbw", [
    (10**9, 0.01, 8, 100.0, 175.0),  # nccl-tests: busbw = algbw * 2 (n - 1) / n
    (10**9, 0.01, 2, 100.0, 100.0),
    (10**9, 0.01, 4, 100.0, 150.0),
    (2**30, 0.5, 1, 2**30 / 0.5 / 1e9, None),  # one rank: no link, no busbw
])
def test_bus_bandwidth(nbytes, seconds, world, algbw, busbw):
    got = bench_nccl.bus_bandwidth(nbytes, seconds, world)
    assert got[0] == pytest.approx(algbw)
    assert got[1] == (pytest.approx(busbw) if busbw is not None else None)


def test_bench_nccl_without_gpu_says_why(tmp_path):
    out = _last_json([sys.executable, str(REPO / "benchmarks/bench_nccl.py")], tmp_path)
    assert out == {"bench": "nccl", "skipped": "no CUDA GPU"} or out.get("rows")


def test_bench_nccl_gloo_smoke(tmp_path):
    out = _last_json([sys.executable, str(REPO / "benchmarks/bench_nccl.py"), "--device", "cpu", "--sizes-mb", "1",
                      "--iters", "2", "--warmup", "1"], tmp_path)
    assert out["ranks"] == 1 and out["busbw_gbs_max"] is None and "needs >= 2 GPUs" in out["busbw_skipped"]
    row = out["rows"][0]
    assert row["size_bytes"] == 2**20 and row["time_us"] > 0 and row["busbw_gbs"] is None


def test_model_configs_of_the_mfu_table_exist():
    for name in ("125m", "350m", "1.3b", "7b"):
        cfg = bench_mfu.model_config(name, 32000, 2048)
        assert cfg.vocab_size == 32000 and cfg.max_seq_len == 2048
        assert cfg.head_dim in (64, 128)  # the head dims tests/gpu/test_sdpa_backend.py checks
