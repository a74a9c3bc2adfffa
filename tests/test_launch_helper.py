"""The test launcher leaves nothing behind: ranks that run past the timeout are killed, with torchrun
(killing torchrun alone left ranks running, holding ports and CPU, for the rest of the session); and a
fork-launched rank is the rank torchrun would start."""
import json
import os
import time

import pytest

from tests.conftest import rank_exit_statuses
from tests.helpers.launch import run_ranks

pytestmark = pytest.mark.slow  # a torchrun start: the launcher is used by every training test anyway

RANK = """
import os, pathlib, sys, time
pathlib.Path(sys.argv[1], f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone but for its exit status
        return f.read().split(") ")[-1][0] != "Z"


@pytest.mark.timeout(120)  # a launcher that leaves a rank behind blocks on its output: fail, do not hang
@pytest.mark.parametrize("launcher", ["torchrun", "fork"])
def test_timed_out_ranks_are_killed(tmp_path, launcher):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    started = time.monotonic()
    with pytest.raises(AssertionError, match="ran past 10 s and was killed with its ranks"):
        run_ranks(2, [str(tmp_path)], script=script, timeout=10, launcher=launcher)
    assert time.monotonic() - started < 60
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
    assert len(pids) == 2, "both ranks should have started within the timeout"
    time.sleep(0.5)
    assert not [pid for pid in pids if _alive(pid)]


DESCRIBE = """
import json, multiprocessing, os, pathlib, sys, time, psutil, torch
import torch.distributed as dist
pathlib.Path(sys.argv[1], f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
        "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "OMP_NUM_THREADS", "WANDB_MODE", "MY_VAR")
seen = {"env": {k: os.environ.get(k) for k in keys}, "argv": sys.argv[1:], "name": __name__,
        "cwd": os.getcwd(), "path0": sys.path[0], "start_method": multiprocessing.get_start_method(),
        "threads": torch.get_num_threads(), "all_reduce": total.item(), "master_port": bool(os.environ["MASTER_PORT"])}
pathlib.Path(sys.argv[1], f"rank{dist.get_rank()}.json").write_text(json.dumps(seen, sort_keys=True))
rank = dist.get_rank()
dist.destroy_process_group()
code = int(os.environ.get("EXIT_RANK1", "0")) if rank == 1 else 0
if code:  # fail once rank 0 has exited: a launcher stops (SIGTERM, SIGKILL) the ranks left when one fails
    rank0 = int(pathlib.Path(sys.argv[1], "pid0").read_text())
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if psutil.Process(rank0).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
sys.exit(code)
"""


@pytest.mark.timeout(300)
def test_a_fork_launched_rank_sees_what_a_torchrun_rank_sees(tmp_path):
    """Environment, arguments, ``__main__``, working directory, ``sys.path[0]``, start method of its own
    children, threads, a gloo group; exit statuses recorded per rank and a failure reported as torchrun
    reports it (status 1 and the rank's ``exitcode``)."""
    script = tmp_path / "describe.py"
    script.write_text(DESCRIBE)
    seen = {}
    for launcher in ("torchrun", "fork"):
        out = tmp_path / launcher
        out.mkdir()
        status = tmp_path / f"{launcher}_status"
        proc = run_ranks(2, [str(out), "extra"], script=script, launcher=launcher, extra_env={"MY_VAR": "x"},
                         exit_status=status, cwd=tmp_path)
        assert proc.returncode == 0 and rank_exit_statuses(status) == {0: 0, 1: 0}
        seen[launcher] = {r: json.loads((out / f"rank{r}.json").read_text().replace(str(out), "OUT"))
                          for r in (0, 1)}
    assert seen["fork"] == seen["torchrun"], json.dumps(seen, indent=1)
    assert seen["fork"][1]["env"]["RANK"] == "1" and seen["fork"][0]["all_reduce"] == 3.0
    for launcher in ("torchrun", "fork"):
        out = tmp_path / f"{launcher}_fail"
        out.mkdir()
        status = tmp_path / f"{launcher}_fail_status"
        proc = run_ranks(2, [str(out)], script=script, launcher=launcher, extra_env={"EXIT_RANK1": "3"},
                         exit_status=status, check=False)
        assert proc.returncode == 1 and "exitcode  : 3" in proc.stderr, (launcher, proc.stderr[-2000:])
        assert rank_exit_statuses(status) == {0: 0, 1: 3}
