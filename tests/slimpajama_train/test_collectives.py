"""No collective on a CPU tensor over a group that is NCCL-only on GPUs (checkpoint, metrics, preemption)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from slimpajama_train.distributed import process_group_backend
from tests.conftest import EXIT_STATUS_HELPER, REPO, rank_exit_statuses, tiny_train_overrides

GUARD = REPO / "tests/slimpajama_train/collective_guard.py"


def test_gpu_default_group_serves_cpu_tensors_with_gloo():
    spec = dict(part.split(":") for part in process_group_backend(cuda=True).split(","))
    assert spec == {"cuda": "nccl", "cpu": "gloo"}
    assert process_group_backend(cuda=False) == "gloo"


def _guarded_run(shards: Path, run_dir: Path, backend: str, *extra: str,
                 env: dict | None = None) -> tuple[list[dict], int, dict[int, int]]:
    """(violations, collectives checked, each rank's exit status) of a guarded 6-step run on 2 ranks."""
    out, status_dir = run_dir / "guard", run_dir / "exit_status"
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(EXIT_STATUS_HELPER), str(GUARD),
           *tiny_train_overrides(shards, run_dir, "checkpoint.interval=2", *extra, backend=backend, steps=6)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                               "GUARD_OUT": str(out), "EXIT_STATUS_DIR": str(status_dir), **(env or {})})
    records = []
    for rank in (0, 1):
        path = Path(f"{out}.rank{rank}")
        assert path.is_file(), proc.stderr[-4000:]
        records += [json.loads(line) for line in path.read_text().splitlines()]
    summaries = [r for r in records if "calls" in r]
    assert len(summaries) == 2
    statuses = rank_exit_statuses(status_dir)
    assert len(statuses) == 2, proc.stderr[-4000:]
    return [r for r in records if "calls" not in r], sum(s["calls"] for s in summaries), statuses


@pytest.mark.parametrize("backend,extra", [
    ("fsdp2", ["checkpoint.async_save=true"]),  # the async save is polled every step: a collective per step
    ("zero2", []),
], ids=["fsdp2_async_save", "zero2"])
def test_no_cpu_tensor_collective_on_an_nccl_only_group(demo_shards, tmp_path, backend, extra):
    # SIGTERM on rank 1 after step 3: the stop vote, the save it triggers and the exit all run guarded.
    violations, calls, statuses = _guarded_run(demo_shards, tmp_path, backend, *extra,
                                               env={"GUARD_SIGNAL_STEP": "3", "GUARD_SIGNAL_RANK": "1"})
    print(f"{backend}: {calls} collectives checked, {len(violations)} violations, exit statuses {statuses}")
    assert calls > 50 and not violations, violations[:5]
    assert statuses == {0: 75, 1: 75}  # both ranks stopped for requeue
    assert json.loads((tmp_path / "preempted.json").read_text())["step"] in (3, 4)


def test_the_guard_catches_cpu_tensors_on_an_nccl_only_default_group(demo_shards, tmp_path):
    """Negative control: with the default group NCCL-only (what init_process_group("nccl") gave
    before), the same run's metric, checkpoint and stop-vote collectives are all flagged."""
    violations, _, statuses = _guarded_run(demo_shards, tmp_path, "fsdp2", "checkpoint.async_save=true",
                                           env={"GUARD_DEFAULT_SPEC": "nccl"})
    assert statuses == {0: 0, 1: 0}  # the guard records violations; the run itself finishes
    where = " ".join(" ".join(v["where"]) for v in violations)
    assert violations and "all_reduce_sum" in where and "checkpoint.py" in where
