"""Backends behind one interface: equivalence, precision, activation checkpointing, non-finite steps."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimpajama_train.backends.base import BackendConfig
from slimpajama_train.backends.deepspeed import deepspeed_config
from slimpajama_train.optim import OptimConfig
from tests.conftest import REPO, read_metrics, run_torchrun

EQUIV_STEPS = 24


def _overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.path={shards}", f"run_dir={run_dir}", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "backend.precision=fp32", "data.micro_batch_size=2", "data.num_workers=0",
        "trainer.global_batch_size=8", "trainer.log_interval=1", "trainer.eval_interval=0", "checkpoint.interval=0",
        "optim.warmup_steps=4", "optim.lr=1e-3", "logger.wandb.enabled=false", *extra,
    ]


def _train_losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


@pytest.fixture(scope="module")
def reference(demo_shards, tmp_path_factory) -> list[float]:
    """One process, 4 micro-batches of 2 accumulated per step."""
    run_dir = tmp_path_factory.mktemp("ref")
    run_torchrun(1, _overrides(demo_shards, run_dir, f"trainer.max_steps={EQUIV_STEPS}"), cwd=REPO)
    losses = _train_losses(run_dir)
    assert len(losses) == EQUIV_STEPS and losses[-1] < losses[0]
    return losses


@pytest.mark.parametrize(
    "nproc,extra",
    [
        (1, ["data.micro_batch_size=8"]),  # one batch 4x larger instead of 4 accumulated micro-batches
        (2, ["backend=fsdp2"]),
        (2, ["backend=zero1"]),
        (2, ["backend=zero2"]),
        (2, ["backend=zero3"]),
    ],
    ids=["accum4_vs_batch4x", "fsdp2_2proc", "zero1_2proc", "zero2_2proc", "zero3_2proc"],
)
def test_same_loss_curve_within_1e_5(reference, demo_shards, tmp_path, nproc, extra):
    run_torchrun(nproc, _overrides(demo_shards, tmp_path, f"trainer.max_steps={EQUIV_STEPS}", *extra[:1],
                                   "backend.precision=fp32"), cwd=REPO)
    losses = _train_losses(tmp_path)
    assert len(losses) == EQUIV_STEPS
    worst = max(abs(a - b) for a, b in zip(losses, reference))
    print(f"{extra[0]} on {nproc} process(es): max |loss - reference| over {EQUIV_STEPS} steps = {worst:.2e}")
    assert worst < 1e-5


def test_deepspeed_config_is_derived_from_ours(tmp_path):
    cfg = BackendConfig(name="deepspeed", zero_stage=3, precision="bf16", offload_optimizer=True, offload_params=True)
    ds = deepspeed_config(cfg, OptimConfig(grad_clip=0.5), micro_batch=4, grad_accum=3, world_size=8)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (96, 4, 3)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" == ds["zero_optimization"]["offload_param"]["device"]
    fp16 = deepspeed_config(BackendConfig(name="deepspeed", precision="fp16"), OptimConfig(), 1, 1, 1)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0 and fp16["fp16"]["initial_scale_power"] == 16


def test_user_deepspeed_json_overrides_but_cannot_contradict(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1234}, "train_batch_size": "auto",
                                "gradient_accumulation_steps": 3}))
    cfg = BackendConfig(name="deepspeed", zero_stage=2, deepspeed_config=str(user))
    ds = deepspeed_config(cfg, OptimConfig(), 4, 3, 2)
    assert ds["zero_optimization"] == {**ds["zero_optimization"], "stage": 2, "reduce_bucket_size": 1234}
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=16 disagrees"):
        deepspeed_config(cfg, OptimConfig(), 4, 3, 2)
    user.write_text('{"fp16": {"enabled": true}}')
    with pytest.raises(ValueError, match="fp16.enabled"):
        deepspeed_config(cfg, OptimConfig(), 4, 3, 2)
    user.write_text('{\n  "zero_optimization": {,}\n}')
    with pytest.raises(ValueError, match=r"ds.json:2: invalid JSON"):
        deepspeed_config(cfg, OptimConfig(), 4, 3, 2)


@pytest.mark.parametrize("backend", ["fsdp2", "zero2"])
def test_fp16_dynamic_loss_scaling_counts_skipped_steps(demo_shards, tmp_path, backend):
    # An initial scale of 2**24 overflows fp16 at once: the first steps are skipped while it halves.
    run_torchrun(2, _overrides(demo_shards, tmp_path, f"backend={backend}", "backend.precision=fp16", "trainer.max_steps=14",
                               "backend.initial_loss_scale=16777216", "trainer.max_consecutive_skips=20", "data.micro_batch_size=4"), cwd=REPO)
    metrics = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert metrics[-1]["skipped_steps"] >= 1
    assert metrics[-1]["loss_scale"] < 2.0**24
    assert all(math.isfinite(m["loss"]) for m in metrics) and metrics[-1]["loss"] < metrics[0]["loss"]


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_activation_checkpointing_lowers_peak_memory_not_loss(demo_shards, tmp_path, backend):
    peaks, curves = {}, {}
    # Peak RSS on CPU varies by a few tens of MB from run to run; 64 samples per micro-batch make the
    # activation memory that checkpointing saves (~60 MB per mode at 32) well above that noise.
    big = ["model.dim=512", "model.n_layers=4", "model.n_heads=8", "data.micro_batch_size=64",
           "trainer.global_batch_size=64", "trainer.max_steps=2"]
    for mode in ("none", "selective", "full"):
        run_dir = tmp_path / mode
        run_torchrun(1, _overrides(demo_shards, run_dir, f"backend={backend}", "backend.precision=fp32", *big,
                                   f"backend.activation_checkpointing={mode}", "backend.ac_every=2"), cwd=REPO)
        m = [x for x in read_metrics(run_dir) if "loss" in x]
        peaks[mode], curves[mode] = m[-1]["peak_mem_gb"], [x["loss"] for x in m]
    print(backend, "peak memory GB:", peaks)
    assert peaks["full"] < peaks["selective"] < peaks["none"]
    assert curves["full"] == pytest.approx(curves["none"], abs=1e-6)
    assert curves["selective"] == pytest.approx(curves["none"], abs=1e-6)


def _inject(demo_shards: Path, run_dir: Path, nproc: int, nan_steps: str, *extra: str) -> dict:
    env = {**os.environ, "NAN_STEPS": nan_steps, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / "tests/slimpajama_train/inject_nonfinite.py"), *_overrides(demo_shards, run_dir, *extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["fsdp2", "zero1", "zero3"])
def test_nonfinite_step_is_skipped_and_its_samples_logged(demo_shards, tmp_path, backend):
    out = _inject(demo_shards, tmp_path, 2, "3", f"backend={backend}", "trainer.max_steps=6")
    assert out["ok"] and out["skipped_steps"] == 1
    records = [json.loads(l) for l in (tmp_path / "skipped_batches.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["step"] == 3 and records[0]["positions"] == [16, 24]
    assert len(records[0]["samples"]) == 8 and records[0]["samples"][0][0].startswith("train-")
    losses = [m["loss"] for m in read_metrics(tmp_path) if "loss" in m]
    assert math.isnan(losses[2]) and all(math.isfinite(l) for i, l in enumerate(losses) if i != 2)


def test_consecutive_nonfinite_steps_stop_the_run(demo_shards, tmp_path):
    out = _inject(demo_shards, tmp_path, 1, "2,3,4", "trainer.max_steps=8", "trainer.max_consecutive_skips=3")
    assert not out["ok"] and "3 consecutive steps" in out["error"] and out["skipped_steps"] == 3


def test_torch_compile_option_gives_the_same_losses(reference, demo_shards, tmp_path):
    run_torchrun(1, _overrides(demo_shards, tmp_path, "trainer.max_steps=3", "trainer.compile=true"), cwd=REPO, timeout=900)
    assert _train_losses(tmp_path) == pytest.approx(reference[:3], abs=1e-4)


def test_zero3_offload_trains_in_bf16(demo_shards, tmp_path):
    """ZeRO-3 with optimizer and parameters offloaded to CPU (DeepSpeed CPU Adam), bf16 compute."""
    run_torchrun(2, _overrides(demo_shards, tmp_path, "backend=zero3_offload", "backend.precision=bf16",
                               "trainer.max_steps=4", "optim.lr=3e-3"), cwd=REPO, timeout=900)
    losses = _train_losses(tmp_path)
    assert len(losses) == 4 and all(math.isfinite(l) for l in losses) and losses[-1] < losses[0]


def test_bf16_keeps_fp32_master_weights_and_optimizer_state(demo_shards, tmp_path):
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    run_torchrun(2, _overrides(demo_shards, tmp_path, "backend=fsdp2", "backend.precision=bf16", "trainer.max_steps=2"), cwd=REPO)
    meta = FileSystemReader(str(tmp_path / "checkpoints/step_00000002/state")).read_metadata().state_dict_metadata
    dtypes = {k: v.properties.dtype for k, v in meta.items() if hasattr(v, "properties") and v.size}
    weights = {k: d for k, d in dtypes.items() if k.startswith("model.")}
    moments = {k: d for k, d in dtypes.items() if "exp_avg" in k}
    assert weights and moments and set(weights.values()) == set(moments.values()) == {torch.float32}
