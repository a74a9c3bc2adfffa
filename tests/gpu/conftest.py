"""GPU tests (marker ``gpu``), skipped with the reason where there is no CUDA GPU.

On a GPU host ``make gpu-check`` (``benchmarks/gpu_check.py``) runs them as::

    python -m pytest -m gpu tests/gpu --confcutdir tests/gpu

They are self-contained: ``--confcutdir`` keeps ``tests/conftest.py`` out (it imports data_prep's
corpus builder, whose zstandard a bare GPU image lacks), the data are synthetic shards in prep's
format (``benchmarks/bench_train.write_synthetic_shards``: numpy only), and the trainer runs through
``tests/gpu/train_helper.py`` (TrainConfig from ``key=value`` overrides, no Hydra). Every rank
count is "all local GPUs" (``torch.cuda.device_count()``), launched with torchrun.

With ``$GPU_CHECK_RECORD`` set, tests append measured figures (loss differences, the attention
kernel chosen) to that JSON-lines file through the ``record`` fixture; gpu_check reports them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
HELPER = REPO / "tests/gpu/train_helper.py"
NO_GPU_REASON = "no CUDA GPU (torch.cuda.is_available() is False); run on a GPU host: make gpu-check"
PREEMPTED_EXIT_CODE = 75


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` skip (not fail) without CUDA, whichever directory they are in."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def n_gpus() -> int:
    return torch.cuda.device_count()


def global_batch(micro: int, world: int) -> int:
    """A global batch every world size from 1 to 8 divides: ``grad_accum = 8 // world`` (at least 1)."""
    return micro * world * max(1, 8 // world)


def train_overrides(shards: Path, run_dir: Path, *extra: str, steps: int = 8, micro: int = 4,
                    world: int | None = None) -> list[str]:
    """A small bf16 run (dim 256, 4 layers, head dim 64, vocab 32000, seq 256; seconds on a GPU) that
    logs every step; the global batch is the same for 1 and for N GPUs, so their losses compare."""
    world = n_gpus() if world is None else world
    return [
        f"data.path={shards}", f"run_dir={run_dir}", "backend.name=fsdp2", "backend.precision=bf16",
        "model.dim=256", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=4",
        f"data.micro_batch_size={micro}", "data.num_workers=1",
        f"trainer.global_batch_size={global_batch(micro, world)}", f"trainer.max_steps={steps}",
        "trainer.log_interval=1", "trainer.eval_interval=0", "trainer.compile=false", "checkpoint.interval=0",
        "optim.lr=1e-3", "optim.warmup_steps=2", "logger.console=false", "logger.wandb.enabled=false",
        "dist.step_timeout_s=300", *extra,
    ]


def helper_cmd(nproc: int, args: list[str], torchrun: bool | None = None, script: Path = HELPER) -> list[str]:
    """``script`` (the trainer helper) alone (one process) or under torchrun over ``nproc`` processes
    (torchrun by default when ``nproc > 1``)."""
    if torchrun if torchrun is not None else nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                str(script), *args]
    return [sys.executable, str(script), *args]


def helper_env(**extra: str) -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "4", **extra}


def launch(nproc: int, args: list[str], torchrun: bool | None = None, timeout: float = 300,
           check: bool = True) -> subprocess.CompletedProcess:
    """Run the helper; with ``check``, raise with its output unless it exits 0."""
    proc = subprocess.run(helper_cmd(nproc, args, torchrun), cwd=REPO, env=helper_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(helper_cmd(nproc, args, torchrun)[:6])} ... failed ({proc.returncode}):\n"
                             f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-8000:]}")
    return proc


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in:\n{stdout[-3000:]}")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Train loss per logged step (the last record of a step wins: a resumed run rewrites it)."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


@pytest.fixture(scope="session")
def gpus() -> int:
    return n_gpus()


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Synthetic shards: vocab 32000 (losses start near ln 32000 = 10.4), seq 256, 4096 train samples."""
    from benchmarks.bench_train import write_synthetic_shards

    return write_synthetic_shards(tmp_path_factory.mktemp("gpu_shards"), vocab_size=32000, seq_len=256,
                                  train_samples=4096, val_samples=128)


@pytest.fixture
def record(request):
    """``record(**figures)``: append them, under the test's id, to ``$GPU_CHECK_RECORD`` (if set)."""
    path = os.environ.get("GPU_CHECK_RECORD")

    def _record(**figures) -> None:
        print(f"{request.node.nodeid}: {figures}")
        if path:
            with open(path, "a") as fh:
                fh.write(json.dumps({"test": request.node.nodeid, **figures}, default=str) + "\n")

    return _record
