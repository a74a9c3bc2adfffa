"""The one way tests start ranks: :func:`run_ranks` (to the end) and :func:`start_torchrun` (in the
background, to signal or kill). Gloo on CPU, one thread per rank, W&B offline, the repository
importable (helpers import ``tests.*``).

A rank runs the trainer (``-m slimpajama_train.train OVERRIDES``, the default) or a helper script
(``script=``), under one of two launchers:

- ``launcher="fork"`` (the default of :func:`run_ranks`): each rank is forked from one server process
  per test session that has already imported torch, DeepSpeed, Hydra and the rest of the third-party
  stack (``multiprocessing``'s forkserver; :mod:`tests.helpers.rank_preload`), then runs the same
  entry point as ``__main__`` with the environment torchrun gives a rank (``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ``TORCHELASTIC_*``) and its
  own interpreter exit (atexit hooks). What it saves is the start-up, not the run: a tiny 2-rank run
  takes 2 s instead of 6 (torchrun's own import and rendezvous, ~2 s of imports per rank). Project
  modules are not preloaded: each rank imports them itself, as under torchrun.
- ``launcher="torchrun"``: ``python -m torch.distributed.run --standalone``. For the tests where the
  launcher is part of what is tested (signals forwarded by torchrun, restarts, a rank killed while the
  others run, SLURM's ``srun torchrun``) and one run per backend that proves the trainer under it.

Either way ``exit_status=DIR`` records each rank's own exit status in ``DIR/rank<N>`` (torchrun itself
reports only the first failure): under torchrun each rank runs under ``exit_status_helper.py``.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing import connection, forkserver
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[2]
HELPERS = REPO / "tests" / "helpers"
# Runs a torchrun rank as its child and records its exit status (torchrun reports only the first failure).
EXIT_STATUS_HELPER = HELPERS / "exit_status_helper.py"
TRAIN = ("-m", "slimpajama_train.train")
# After one rank fails, how long the others get to end on their own before they are killed (torchrun
# sends SIGTERM and waits; a trainer takes SIGTERM for a preemption, so here they are killed).
FAILED_RANK_GRACE_S = 3.0


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
    wrap = [str(EXIT_STATUS_HELPER)] if exit_status is not None else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            *wrap, *_target(script), *args]


def _target(script: Path | str | None) -> list[str]:
    return [str(script)] if script is not None else list(TRAIN)


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


def run_ranks(nproc: int, args: Sequence[str], *, script: Path | str | None = None, cwd: Path = REPO,
              timeout: int = 600, extra_env: dict[str, str] | None = None, exit_status: Path | None = None,
              check: bool = True, launcher: Literal["fork", "torchrun"] = "fork") -> subprocess.CompletedProcess:
    """Run ``nproc`` ranks to the end: a CompletedProcess with every rank's output (stdout and stderr,
    as torchrun passes them on) and torchrun's status (0 when every rank exited 0, else 1). With
    ``check``, raise with the output's tail when it fails. Past ``timeout`` every rank is killed with
    its children (loader workers; with torchrun, torchrun too: a rank left behind would hold its port
    and CPU for the rest of the session) and the output so far reported."""
    if launcher == "fork":
        proc = _run_forked(nproc, args, script, cwd, timeout, launch_env(extra_env), exit_status)
    else:
        proc = _run_torchrun(nproc, args, script, cwd, timeout, extra_env, exit_status)
    if check and proc.returncode != 0:
        raise AssertionError(f"{launcher} ranks failed ({proc.returncode}):\n"
                             f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-8000:]}")
    return proc


def _timed_out(what: str, timeout: int, out: str, err: str) -> AssertionError:
    return AssertionError(f"{what} ran past {timeout} s and was killed with its ranks:\n"
                          f"STDOUT:\n{out[-4000:]}\nSTDERR:\n{err[-8000:]}")


def _run_torchrun(nproc: int, args: Sequence[str], script: Path | str | None, cwd: Path, timeout: int,
                  extra_env: dict[str, str] | None, exit_status: Path | None) -> subprocess.CompletedProcess:
    proc = start_torchrun(nproc, args, script=script, extra_env=extra_env, exit_status=exit_status, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise _timed_out("torchrun", timeout, out, err) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start_torchrun(nproc: int, args: Sequence[str], *, script: Path | str | None = None,
                   extra_env: dict[str, str] | None = None, exit_status: Path | None = None,
                   env: dict[str, str] | None = None, cwd: Path = REPO, **popen) -> subprocess.Popen:
    """Start torchrun in the background (to signal or kill it): stdout and stderr piped as text.
    ``env`` replaces the launch environment (build it with :func:`launch_env`)."""
    return subprocess.Popen(torchrun_cmd(nproc, args, script, exit_status), cwd=cwd,
                            env=env if env is not None else launch_env(extra_env, exit_status),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


# --- the fork launcher -------------------------------------------------------------------------------

def _rank_context() -> multiprocessing.context.ForkServerContext:
    """The session's fork server, started on first use with the launch environment (so the modules it
    preloads see what a rank would) and :mod:`tests.helpers.rank_preload` imported."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.helpers.rank_preload"])
    saved = dict(os.environ)
    os.environ.update(launch_env())  # the server inherits this process's environment when it starts
    try:
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return ctx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, nproc: int, port: int, target: list[str], argv: list[str], env: dict[str, str],
               out: str, err: str, cwd: str) -> None:
    """A rank, in a process forked from the server: torchrun's environment, output to the launch's
    files, the target run as ``__main__``, then the interpreter's exit hooks (what a rank's exit runs)."""
    import atexit
    import runpy

    # The forked process was set up as a forkserver child, whose own children would come from a new
    # fork server; a rank under torchrun forks its loader workers (the platform default).
    multiprocessing.set_start_method(None, force=True)
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      GROUP_RANK="0", GROUP_WORLD_SIZE="1", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc),
                      ROLE_NAME="default", MASTER_ADDR="localhost", MASTER_PORT=str(port),
                      TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0", TORCHELASTIC_RUN_ID="fork")
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(cwd)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))  # what torch reads from it at start-up
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *argv]
            sys.path.insert(0, cwd)  # as `python -m` does
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target[0], *argv]
            sys.path.insert(0, str(Path(target[0]).parent))  # as `python SCRIPT` does
            runpy.run_path(target[0], run_name="__main__")
    finally:
        atexit._run_exitfuncs()


def _status_line(rank: int, pid: int, code: int) -> str:
    # torchrun's words for a failed rank, which tests and users grep for
    import signal

    what = f"Signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exit {code}"
    return f"[fork launcher] rank {rank} (pid {pid}) failed: exitcode  : {code} ({what})\n"


def _run_forked(nproc: int, args: Sequence[str], script: Path | str | None, cwd: Path, timeout: int,
                env: dict[str, str], exit_status: Path | None) -> subprocess.CompletedProcess:
    ctx = _rank_context()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        out.touch()
        err.touch()
        ranks = [ctx.Process(target=_rank_main, name=f"rank{r}",
                             args=(r, nproc, port, _target(script), list(args), env, str(out), str(err), str(cwd)))
                 for r in range(nproc)]
        for p in ranks:
            p.start()
        deadline, failed_at, timed_out = time.monotonic() + timeout, None, False
        while any(p.exitcode is None for p in ranks):
            connection.wait([p.sentinel for p in ranks if p.exitcode is None], timeout=0.5)
            now = time.monotonic()
            if failed_at is None and any(p.exitcode not in (None, 0) for p in ranks):
                failed_at = now
            timed_out = now > deadline
            if timed_out or (failed_at is not None and now - failed_at > FAILED_RANK_GRACE_S):
                for p in ranks:
                    if p.exitcode is None:
                        kill_tree(p.pid)
                for p in ranks:
                    p.join()
        codes = [p.exitcode for p in ranks]
        stdout, stderr = out.read_text(), err.read_text()
    stderr += "".join(_status_line(r, p.pid, c) for r, (p, c) in enumerate(zip(ranks, codes, strict=True)) if c != 0)
    if exit_status is not None:
        exit_status.mkdir(parents=True, exist_ok=True)
        for r, code in enumerate(codes):
            (exit_status / f"rank{r}").write_text(f"{code}\n")
    if timed_out:
        raise _timed_out("fork-launched ranks", timeout, stdout, stderr)
    cmd = ["fork", f"--nproc-per-node={nproc}", *_target(script), *args]
    return subprocess.CompletedProcess(cmd, 0 if all(c == 0 for c in codes) else 1, stdout, stderr)
