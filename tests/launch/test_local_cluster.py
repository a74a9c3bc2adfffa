"""launch/slurm/local_cluster.sh manages exactly the daemons it started: a second cluster (its own
DIR, ports and munged) starts, stops and starts again beside the test cluster, and stop leaves alone
both the test cluster's daemons and foreign processes that merely share the daemons' names."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.helpers.slurm_cluster import CLUSTER_DIR, CLUSTER_SCRIPT

# slow: `make test-fast` leaves the module out; one pytest-xdist worker runs this module and the
# other SLURM one (tests/conftest.py: ONE_WORKER)
pytestmark = pytest.mark.slow

DAEMONS = ("slurmd", "slurmctld", "munged")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _pid_files(directory: Path) -> dict[str, Path]:
    return {"slurmd": directory / "slurmd.pid", "slurmctld": directory / "slurmctld.pid",
            "munged": directory / "munge" / "munged.pid"}


def _alive(pid: int, name: str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name and "Z" not in _state(pid)
    except OSError:
        return False


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _cluster(cmd: str, directory: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), cmd, str(directory)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"local_cluster.sh {cmd} failed:\n{proc.stdout}\n{proc.stderr}"


def _node_up(directory: Path) -> bool:
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"],
                          env={**os.environ, "SLURM_CONF": str(directory / "slurm.conf")},
                          capture_output=True, text=True, timeout=60)
    return proc.returncode == 0 and any(s in ("idle", "mix", "alloc") for s in proc.stdout.split())


def test_start_stop_start_manages_only_its_own_daemons(slurm_env, tmp_path):
    # Processes named like the daemons that the script did not start (pgrep -x would match them).
    foreign = []
    for name in DAEMONS:
        exe = tmp_path / "bin" / name
        exe.parent.mkdir(exist_ok=True)
        shutil.copy(shutil.which("sleep"), exe)
        foreign.append(subprocess.Popen([str(exe), "1000"]))
    # the test cluster's daemons (all three where this script started it)
    main = {name: int(path.read_text()) for name, path in _pid_files(CLUSTER_DIR).items() if path.is_file()}
    assert all(_alive(pid, name) for name, pid in main.items())
    second = tmp_path / "c2"  # short: munged's socket path must fit in sun_path (108 bytes)
    env = {**os.environ, "SLURMCTLD_PORT": str(_free_port()), "SLURMD_PORT": str(_free_port())}
    try:
        for _ in range(2):  # start, stop, start again, stop
            _cluster("start", second, env)
            started = {name: int(path.read_text()) for name, path in _pid_files(second).items()}
            assert all(_alive(pid, name) for name, pid in started.items()), started
            assert _node_up(second)
            conf = (second / "slurm.conf").read_text()
            assert f"AuthInfo=socket={second}/munge/munge.socket" in conf
            _cluster("stop", second, env)
            assert not any(_alive(pid, name) for name, pid in started.items())  # stop waited for them
            assert not any(path.exists() for path in _pid_files(second).values())
            assert all(p.poll() is None for p in foreign)  # the foreign namesakes are untouched
            assert all(_alive(pid, name) for name, pid in main.items())  # and so is the test cluster
        assert _node_up(CLUSTER_DIR)
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(second)], env=env, capture_output=True, timeout=300)
        for p in foreign:
            p.kill()
            p.wait()
