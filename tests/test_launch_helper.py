"""The test launcher leaves nothing behind: a torchrun that runs past its timeout is killed with its
ranks (killing torchrun alone left ranks running, holding ports and CPU, for the rest of the session)."""
import os
import time

import pytest

from tests.helpers.launch import run_torchrun

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
def test_a_timed_out_torchrun_is_killed_with_its_ranks(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    started = time.monotonic()
    with pytest.raises(AssertionError, match="ran past 20 s and was killed with its ranks"):
        run_torchrun(2, [str(tmp_path)], script=script, timeout=20)
    assert time.monotonic() - started < 60
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
    assert len(pids) == 2, "both ranks should have started within the timeout"
    time.sleep(0.5)
    assert not [pid for pid in pids if _alive(pid)]
