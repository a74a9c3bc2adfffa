"""Start (or reuse) the one-node SLURM cluster of launch/slurm/local_cluster.sh for the tests, and
talk to it: submit, wait for a state, read a job's fields."""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

CLUSTER_SCRIPT = REPO / "launch/slurm/local_cluster.sh"
CLUSTER_DIR = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/slurm-local"))
BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be started here; the message says why (the tests skip with it)."""


def _controller_cmdlines() -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-x", "slurmctld"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def cluster_env() -> dict[str, str]:
    """Environment for sbatch/scontrol against a running test cluster, starting it if needed. One
    process at a time (pytest-xdist workers): a second start beside a starting cluster would race it."""
    CLUSTER_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(CLUSTER_DIR.parent / f".{CLUSTER_DIR.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _cluster_env()


def _cluster_env() -> dict[str, str]:
    if os.geteuid() != 0:
        raise ClusterUnavailable("starting munged/slurmctld/slurmd needs root")
    if not all(shutil.which(b) for b in BINARIES):
        proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "install"], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not all(shutil.which(b) for b in BINARIES):
            raise ClusterUnavailable(f"SLURM packages are not installed and could not be: {proc.stderr.strip()[-500:]}")
    conf = CLUSTER_DIR / "slurm.conf"
    env = {**os.environ, "SLURM_CONF": str(conf)}
    running = _controller_cmdlines()
    if running and not all(str(conf) in line for line in running):
        raise ClusterUnavailable(f"a SLURM controller these tests did not start is running ({running[0]}); "
                                 "not touching it")
    if running and _node_ready(env):
        return env
    proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(CLUSTER_DIR)], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 or not _node_ready(env):
        output = (proc.stdout + proc.stderr).strip()
        raise ClusterUnavailable(f"the local SLURM cluster did not start: {output[-1500:]}")
    return env


def _node_ready(env: dict[str, str]) -> bool:
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True)
    return proc.returncode == 0 and any(s.strip() in ("idle", "mix", "alloc") for s in proc.stdout.splitlines())


def job_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    """What a submitted job inherits (sbatch exports the environment): this Python's bin first, so the
    job's `torchrun` is the one installed next to it, and the repository importable."""
    bin_dir = str(Path(sys.executable).parent)
    return {**env, "PATH": f"{bin_dir}:{env.get('PATH', '')}", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "offline", **extra}


def submit(env: dict[str, str], args: list[str], cwd: Path) -> int:
    proc = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"sbatch failed: {proc.stderr}")
    return int(proc.stdout.strip().split(";")[0])


def job_fields(env: dict[str, str], job: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_state(env: dict[str, str], job: int, states: tuple[str, ...], timeout: float,
                   log: Path | None = None) -> dict[str, str]:
    deadline = time.time() + timeout
    fields: dict[str, str] = {}
    while time.time() < deadline:
        fields = job_fields(env, job)
        if fields.get("JobState") in states:
            return fields
        time.sleep(1)
    tail = log.read_text()[-4000:] if log is not None and log.is_file() else ""
    raise AssertionError(f"job {job} not in {states} after {timeout} s: {fields}\n{tail}")
