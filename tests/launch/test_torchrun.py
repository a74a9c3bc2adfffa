"""launch/torchrun.sh: two torchrun "nodes" rendezvous over c10d on loopback and train exactly like
one node with two processes; with MAX_RESTARTS, a killed rank is restarted in place and the run
resumes to the same losses."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, losses_by_step, tiny_train_overrides
from tests.helpers.launch import kill_tree
from tests.launch.conftest import KILL_STEPS, kill_overrides, kill_rank_after_checkpoint

pytestmark = pytest.mark.slow  # every test here: `make test-fast` leaves the module out

TORCHRUN_SH = REPO / "launch/torchrun.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_c10d_match_one_node_with_two_processes(demo_shards, tiny_runs, tmp_path):
    single = tiny_runs.get("fsdp2")

    multi = tmp_path / "multi"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ENDPOINT": f"127.0.0.1:{_free_port()}",
           "RDZV_ID": "test-multinode", "LOG_DIR": str(tmp_path / "logs")}
    nodes = [subprocess.Popen(["bash", str(TORCHRUN_SH), *tiny_train_overrides(demo_shards, multi)], cwd=REPO,
                              env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:  # torchrun, its ranks and their loader workers: nothing left running
            kill_tree(node.pid)
        tails = "\n".join(f"node {i}:\n{node.communicate()[0][-3000:]}" for i, node in enumerate(nodes))
        raise AssertionError(f"the two nodes did not finish in 600 s; killed them:\n{tails}") from None
    for node, out in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out[-4000:]
    assert "world 2" in outputs[0] + outputs[1]
    # One rank per node: by default the mesh is HSDP (2 replicas x 1 shard: parameters replicated
    # across nodes, gradients all-reduced) where one node runs plain FSDP2 over its 2 ranks; the
    # reductions sum in another order, so the losses agree to fp32 rounding, not bit for bit.
    assert "HSDP 2 replicas x 1 shards" in outputs[0] + outputs[1]
    got, want = losses_by_step(multi), losses_by_step(single)
    assert got.keys() == want.keys()
    for step, pair in want.items():
        for a, b in zip(got[step], pair, strict=True):
            assert (a is None and b is None) or abs(a - b) < 1e-5, (step, got[step], pair)
    assert (multi / "checkpoints/latest").read_text().strip() == "step_00000008"


def test_max_restarts_restarts_a_killed_rank_in_place_and_matches_the_uninterrupted_run(kill_reference, demo_shards,
                                                                                       tmp_path):
    """MAX_RESTARTS=1: kill -9 of one rank past a checkpoint; torchrun stops the other, starts both
    again, they resume from latest and finish with the uninterrupted run's losses."""
    run_dir, logs, out = tmp_path / "run", tmp_path / "logs", tmp_path / "torchrun.out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "NPROC_PER_NODE": "2", "MAX_RESTARTS": "1", "LOG_DIR": str(logs)}
    with out.open("w") as sink:  # a file, not a pipe: nobody drains a pipe while the run goes on
        proc = subprocess.Popen(["bash", str(TORCHRUN_SH), *kill_overrides(demo_shards, run_dir)], cwd=REPO, env=env,
                                stdout=sink, stderr=subprocess.STDOUT)
        try:
            killed = kill_rank_after_checkpoint(run_dir, 1, lambda: out.read_text()[-3000:])
            assert proc.wait(timeout=600) == 0, out.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    text = out.read_text()
    assert killed["step"] < KILL_STEPS, killed
    # one restart of the worker group: the ranks' logs of attempts 0 and 1, the second one resumed
    attempts = sorted({p.name for p in logs.glob("*/attempt_*")})
    assert attempts == ["attempt_0", "attempt_1"], (attempts, text[-3000:])
    resumed = sorted(logs.glob("*/attempt_1/0/stderr.log"))[0].read_text()
    assert "resumed from" in resumed and killed["checkpoint"] in resumed, resumed[-3000:]
    assert losses_by_step(run_dir) == kill_reference  # bitwise: fp32 on CPU
