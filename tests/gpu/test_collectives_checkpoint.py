"""NCCL over all local GPUs: the collectives themselves, an asynchronous checkpoint save and resume,
and the preemption path (a signal on one rank, or SIGTERM to every rank: the ranks agree, save,
write ``preempted.json`` and exit 75 for requeue)."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.gpu.conftest import (
    PREEMPTED_EXIT_CODE,
    REPO,
    helper_cmd,
    helper_env,
    last_json,
    launch,
    losses_by_step,
    read_metrics,
    train_overrides,
)

pytestmark = pytest.mark.gpu

RESUME_ATOL = 2e-2  # bf16 on GPU: atomics in the embedding backward make a resumed run not bitwise equal


def _read_meta(ckpt: Path) -> dict:
    from slimpajama_train.checkpoint import read_meta

    return read_meta(ckpt)  # checks every state file against the sizes the checkpoint recorded


def _exited_for_requeue(returncode: int, stderr: str, torchrun: bool) -> bool:
    if torchrun:  # torchrun reports the ranks' exit status and exits 1 itself
        return returncode != 0 and f"exitcode  : {PREEMPTED_EXIT_CODE}" in stderr
    return returncode == PREEMPTED_EXIT_CODE


def test_nccl_collectives(gpus, record):
    cmd = helper_cmd(gpus, [], torchrun=True, script=REPO / "tests/gpu/collectives_helper.py")
    proc = subprocess.run(cmd, cwd=REPO, env=helper_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = last_json(proc.stdout)
    record(world=out["world"], backend=out["backend"], checks=len(out["checks"]))
    assert out["world"] == gpus and "nccl" in out["backend"].lower()


def test_async_checkpoint_save_and_resume(shards, tmp_path, gpus, record):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    opts = ("checkpoint.async_save=true", "checkpoint.interval=4", "backend.always_shard=true")
    launch(gpus, train_overrides(shards, first, *opts), torchrun=True)
    ckpts = first / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000008"
    for step in (4, 8):
        assert _read_meta(ckpts / f"step_{step:08d}")["step"] == step
    proc = launch(gpus, train_overrides(shards, resumed, *opts, f"checkpoint.resume={ckpts / 'step_00000004'}"),
                  torchrun=True)
    assert "resumed from" in proc.stderr, proc.stderr[-3000:]
    a, b = losses_by_step(first), losses_by_step(resumed)
    assert sorted(b) == [5, 6, 7, 8], b
    diffs = {s: abs(a[s] - b[s]) for s in b}
    blocking = [m["checkpoint_blocking_s"] for m in read_metrics(first) if "checkpoint_blocking_s" in m]
    record(max_abs_loss_diff_after_resume=max(diffs.values()), checkpoint_blocking_s=blocking)
    assert max(diffs.values()) <= RESUME_ATOL, (a, b)


def _check_preempted(run_dir: Path, after: int, max_steps: int) -> int:
    marker = json.loads((run_dir / "preempted.json").read_text())
    step = marker["step"]
    assert after <= step < max_steps, marker
    assert marker["checkpoint"] and marker["checkpoint"].endswith(f"step_{step:08d}"), marker
    assert (run_dir / "checkpoints/latest").read_text().strip() == f"step_{step:08d}"
    assert _read_meta(Path(marker["checkpoint"]))["step"] == step
    return step


def test_signal_on_one_rank_stops_every_rank(shards, tmp_path, gpus, record):
    """SIGUSR1 (SLURM's warning ahead of a time limit) on the last rank only, after step 3: the
    ranks' vote (an asynchronous all-reduce on NCCL) stops them all at the same step."""
    steps = 40
    proc = launch(gpus, ["--kill-at", "3", "--kill-rank", str(gpus - 1), "--kill-signal", "SIGUSR1",
                         *train_overrides(shards, tmp_path, steps=steps)], torchrun=True, check=False)
    assert _exited_for_requeue(proc.returncode, proc.stderr, torchrun=True), (proc.returncode, proc.stderr[-6000:])
    step = _check_preempted(tmp_path, 3, steps)
    record(stopped_at=step, signalled_after=3)


def test_sigterm_to_every_rank_saves_and_exits_for_requeue(shards, tmp_path, gpus, record):
    """SIGTERM to every rank mid-run (what SLURM or Kubernetes does at preemption)."""
    steps = 3000  # far more than the test waits for: the run must stop because of the signal
    pid_dir = tmp_path / "pids"
    cmd = helper_cmd(gpus, ["--pid-dir", str(pid_dir), *train_overrides(shards, tmp_path / "run", steps=steps)],
                     torchrun=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env=helper_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            metrics = tmp_path / "run/metrics.jsonl"
            if metrics.is_file() and any(m.get("step", 0) >= 3 for m in read_metrics(tmp_path / "run")):
                break
            assert proc.poll() is None, f"run ended before step 3: {proc.stderr.read()[-4000:]}"
            time.sleep(0.1)
        else:
            raise AssertionError("no step 3 within 240 s")
        pids = [int(p.read_text()) for p in sorted(pid_dir.glob("rank*.pid"))]
        assert len(pids) == gpus, pids
        t0 = time.time()
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert _exited_for_requeue(proc.returncode, err, torchrun=True), (proc.returncode, err[-6000:])
    step = _check_preempted(tmp_path / "run", 3, steps)
    record(stopped_at=step, exit_s_after_sigterm=round(time.time() - t0, 2))
