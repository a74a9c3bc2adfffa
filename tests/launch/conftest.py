import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, losses_by_step, read_metrics, tiny_train_overrides
from tests.helpers.built_once import built_once
from tests.helpers.launch import run_ranks
from tests.helpers.slurm_cluster import ClusterUnavailable, cluster_env

# A run a rank is killed in: at ~0.1 s a step on two CPU ranks it lasts a few seconds, long enough to
# kill a rank past the first checkpoint (every 4 steps) and well before the end.
KILL_STEPS = 40


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """A running one-node SLURM cluster (started here if needed); skips with the reason where it cannot run."""
    try:
        return cluster_env()
    except ClusterUnavailable as exc:
        pytest.skip(f"SLURM unavailable: {exc}")


def kill_overrides(shards: Path, run_dir: Path) -> list[str]:
    """The tiny fp32 run of the kill tests: every step's loss logged, a checkpoint every 4 steps."""
    return tiny_train_overrides(shards, run_dir, steps=KILL_STEPS)


@pytest.fixture(scope="session")
def kill_reference(demo_shards, tmp_path_factory) -> dict[int, tuple]:
    """Per-step losses of kill_overrides run without interruption (plain torchrun, 2 CPU ranks): what a
    run with a rank killed and restarted (torchrun or SLURM) must reproduce."""
    run_dir = built_once(tmp_path_factory, "kill_reference",
                         lambda run_dir: run_ranks(2, kill_overrides(demo_shards, run_dir), cwd=REPO))
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(KILL_STEPS + 1))
    return losses


def trainer_process(run_dir: Path, rank: int) -> psutil.Process | None:
    """The trainer process of `rank` in the run writing to run_dir: its command line names the run_dir
    and it has RANK=<rank> in its environment (/proc/<pid>/environ) while its parent has not. A data
    loader worker inherits its rank's environment (and, forked, its command line); its parent is the
    rank (or a fork server that a command line without the run_dir already rules out)."""
    marker = f"run_dir={run_dir}"
    for proc in psutil.process_iter():
        try:
            if marker not in proc.cmdline() or "slimpajama_train.train" not in proc.cmdline():
                continue
            if proc.environ().get("RANK") != str(rank):
                continue
            parent = proc.parent()
            if parent is not None and parent.environ().get("RANK") == str(rank):
                continue
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


def _last_step(run_dir: Path) -> int:
    try:
        return max((m["step"] for m in read_metrics(run_dir) if "loss" in m), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line being written
        return 0


def kill_rank_after_checkpoint(run_dir: Path, rank: int, context: Callable[[], str], timeout: float = 300) -> dict:
    """Once run_dir has a checkpoint and a step past it, SIGKILL the trainer process of `rank`: a crash
    mid-run, not a stop the trainer could save for. Returns the checkpoint and the last logged step then."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = run_dir / "checkpoints/latest"
        checkpoint = latest.read_text().strip() if latest.is_file() else ""
        step = _last_step(run_dir)
        assert step < KILL_STEPS, f"the run finished before a rank could be killed: {context()}"
        if checkpoint and step > int(checkpoint.removeprefix("step_")) and (proc := trainer_process(run_dir, rank)):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return {"checkpoint": checkpoint, "step": _last_step(run_dir), "pid": proc.pid}
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint and step past it in {run_dir} within {timeout} s: {context()}")
