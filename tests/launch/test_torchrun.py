"""launch/torchrun.sh: two torchrun "nodes" rendezvous over c10d on loopback and train exactly like
one node with two processes."""
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, losses_by_step, run_torchrun, tiny_train_overrides

TORCHRUN_SH = REPO / "launch/torchrun.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_c10d_match_one_node_with_two_processes(demo_shards, tmp_path):
    single = tmp_path / "single"
    run_torchrun(2, tiny_train_overrides(demo_shards, single), cwd=REPO)

    multi = tmp_path / "multi"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ENDPOINT": f"127.0.0.1:{_free_port()}",
           "RDZV_ID": "test-multinode", "LOG_DIR": str(tmp_path / "logs")}
    nodes = [subprocess.Popen(["bash", str(TORCHRUN_SH), *tiny_train_overrides(demo_shards, multi)], cwd=REPO,
                              env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, out in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out[-4000:]
    assert "world 2" in outputs[0] + outputs[1]
    assert losses_by_step(multi) == losses_by_step(single)
    assert (multi / "checkpoints/latest").read_text().strip() == "step_00000008"
