"""The one way tests start torchrun: ``python -m torch.distributed.run --standalone`` with gloo on
CPU, one thread per rank, W&B offline and the repository importable (helpers import ``tests.*``).

A rank runs the trainer (``-m slimpajama_train.train OVERRIDES``, the default) or a helper script
(``script=``); ``exit_status=`` wraps each rank in ``exit_status_helper.py``, which records the
rank's own exit status (torchrun reports only the first failure).
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HELPERS = REPO / "tests" / "helpers"
# Runs a torchrun rank as its child and records its exit status (torchrun reports only the first failure).
EXIT_STATUS_HELPER = HELPERS / "exit_status_helper.py"
TRAIN = ("-m", "slimpajama_train.train")


def launch_env(extra_env: dict[str, str] | None = None, exit_status: Path | None = None) -> dict[str, str]:
    # The repository first; what the session put on PYTHONPATH (the fast suite's import recorder) kept.
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    if exit_status is not None:
        env["EXIT_STATUS_DIR"] = str(exit_status)
    return {**env, **(extra_env or {})}


def torchrun_cmd(nproc: int, args: Sequence[str], script: Path | str | None = None,
                 exit_status: Path | None = None) -> list[str]:
    """The command line: torchrun on ``nproc`` local ranks, each running ``script ARGS`` (a helper) or
    the trainer with ``args`` as Hydra overrides; ``exit_status``: each rank under EXIT_STATUS_HELPER."""
    target = [str(script)] if script is not None else list(TRAIN)
    wrap = [str(EXIT_STATUS_HELPER)] if exit_status is not None else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            *wrap, *target, *args]


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant, found before any is killed. Not the process group:
    torchrun starts each rank in a session of its own, so a group kill misses the ranks, and they keep
    torchrun's output pipes (and a reader of them) open."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def run_torchrun(nproc: int, args: Sequence[str], *, script: Path | str | None = None, cwd: Path = REPO,
                 timeout: int = 600, extra_env: dict[str, str] | None = None, exit_status: Path | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Run to the end; with ``check``, raise with the output's tail when it fails. Past ``timeout``
    the whole process tree is killed (torchrun, its ranks and their loader workers: a rank left
    behind would hold its port and CPU for the rest of the session) and the output so far reported."""
    proc = start_torchrun(nproc, args, script=script, extra_env=extra_env, exit_status=exit_status, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun ran past {timeout} s and was killed with its ranks:\n"
                             f"STDOUT:\n{out[-4000:]}\nSTDERR:\n{err[-8000:]}") from None
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n"
                             f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-8000:]}")
    return proc


def start_torchrun(nproc: int, args: Sequence[str], *, script: Path | str | None = None,
                   extra_env: dict[str, str] | None = None, exit_status: Path | None = None,
                   env: dict[str, str] | None = None, cwd: Path = REPO, **popen) -> subprocess.Popen:
    """Start in the background (to signal or kill it): stdout and stderr piped as text. ``env``
    replaces the launch environment (build it with :func:`launch_env`)."""
    return subprocess.Popen(torchrun_cmd(nproc, args, script, exit_status), cwd=cwd,
                            env=env if env is not None else launch_env(extra_env, exit_status),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
