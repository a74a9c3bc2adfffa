"""DataLoader workers that outlive the scheduler's preemption signals and are shut down before exit."""
from __future__ import annotations

import atexit
import multiprocessing.sharedctypes
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader
from torch.utils.data._utils.signal_handling import _remove_worker_pids, _set_worker_pids


def ignore_preemption_signals(worker_id: int, loader_pid: int | None = None, started: Any = None) -> None:
    """``worker_init_fn``: loader workers outlive the scheduler's preemption signals.

    SLURM (SIGUSR1 ahead of the time limit, SIGTERM on preemption/cancel) and Kubernetes (SIGTERM)
    signal every process of the job, loader workers included. The trainer rank catches them and
    finishes its step and checkpoint; a worker that died of them would make its next ``next(it)``
    raise "DataLoader worker exited unexpectedly". So both are ignored here.

    Workers still exit when they should: when the DataLoader shuts them down (done event and
    ``None`` sentinel on their index queue), and when their parent dies (the DataLoader's watchdog
    notices the parent pid change). One SIGTERM still counts: the one the parent itself sends
    (``Process.terminate``: a shutdown whose join timed out, and multiprocessing's exit handler,
    which terminates and then joins, without timeout, the daemonic workers of a DataLoader iterator
    still alive at interpreter exit: with a plain SIG_IGN that exit hangs). SIGTERM is therefore
    blocked and taken by a thread with ``sigwaitinfo``, which sees the sender: from the
    parent it exits at once (what torch's own worker SIGTERM handler does), from anyone else it is
    dropped. ``loader_pid``, the process that owns the DataLoader, also counts as the parent (under
    the forkserver start method, the worker's parent process is the fork server). Without
    ``sigwaitinfo`` (not Linux), SIGTERM keeps torch's handler.

    ``started``: the loader's shared slots (:func:`start_workers`); this worker writes its pid into
    slot ``worker_id`` once it runs Python code, which a worker stuck inside ``os.fork`` never does.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if started is not None:
        started[worker_id] = os.getpid()
    if not (hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")):
        return
    parents = frozenset({os.getppid(), loader_pid or os.getppid()})
    # Ignored and blocked: a blocked signal is never discarded but stays pending for sigwaitinfo.
    # SIG_IGN covers threads started before this call, which do not block it (none with the fork
    # start method; under spawn/forkserver, native threads of torch, see _LOADERS_WITH_WORKERS).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
    threading.Thread(target=_sigterm_from_parent_only, args=(parents,), name="sigterm-filter", daemon=True).start()


def _sigterm_from_parent_only(parents: frozenset[int]) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid in parents:
            os._exit(0)


# Loaders whose workers ignore SIGTERM. At interpreter exit multiprocessing SIGTERMs, then joins
# without timeout, the daemonic workers still alive (a persistent-workers DataLoader keeps its
# iterator, so its workers outlive every other reference). The thread above honours that SIGTERM
# only where it is the one thread without the signal blocked: with the fork start method; under
# spawn/forkserver, native threads started by importing torch may swallow it. So the workers of
# these loaders are first shut down the ordinary way (done event, sentinel, join), by a hook that
# runs before multiprocessing's and torch's own (atexit runs the last registered first).
_LOADERS_WITH_WORKERS: weakref.WeakSet[DataLoader] = weakref.WeakSet()


def shut_down_workers(loader: DataLoader) -> None:
    """Stop the persistent workers of ``loader`` (and its pinning thread) the ordinary way: done
    event, sentinel, join. They ignore the scheduler's SIGTERM, so a trainer that is done with a
    loader calls this rather than leave them to the interpreter's exit. A no-op for a loader
    without workers or never iterated; a later ``iter(loader)`` starts new ones."""
    it = getattr(loader, "_iterator", None)
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
        loader._iterator = None


def _shut_down_loader_workers() -> None:
    for loader in list(_LOADERS_WITH_WORKERS):
        try:
            shut_down_workers(loader)
        except Exception:  # exiting anyway: multiprocessing's own handler is the fallback
            pass


# Registered after multiprocessing.util's and torch.utils.data's hooks (both imported above).
atexit.register(_shut_down_loader_workers)


def track_loader_workers(loader: DataLoader) -> DataLoader:
    _LOADERS_WITH_WORKERS.add(loader)
    return loader


# A worker forked while another thread of the rank creates or deletes a Python thread state (a C++
# thread of gloo or NCCL entering Python to drop a tensor's reference, say) can hang for ever inside
# os.fork, before running any Python code: CPython gh-112275, fixed in 3.11.10 and 3.12.1. Seen here
# on 3.11.7 (gdb: PyOS_AfterFork_Child -> _PyThreadState_DeleteExcept waiting on the runtime's HEAD
# lock) in two loaded test runs: the rank then waited for its first batch for ever. So the trainer
# starts its loaders' workers with start_workers, which gives them this long to run their first line,
# and forks a stuck one again (a healthy fork reaches it in milliseconds, a loaded host in seconds).
WORKER_START_TIMEOUT_S = 30.0
WORKER_START_ATTEMPTS = 3


def worker_start_slots(num_workers: int) -> Any:
    """Shared slots (one per worker, inherited by fork, passed at spawn) for ``ignore_preemption_signals``'
    ``started``; kept on the loader as ``loader.worker_started`` for :func:`start_workers`."""
    return multiprocessing.sharedctypes.RawArray("q", num_workers)


def _stuck_workers(it: Any, started: Any, timeout: float) -> list[Any]:
    """The workers of iterator ``it`` still alive without having written their slot after ``timeout``
    seconds (a worker that died is the DataLoader's to report, on the next batch)."""
    deadline = time.monotonic() + timeout
    while True:
        waiting = [w for i, w in enumerate(it._workers) if started[i] != w.pid and w.is_alive()]
        if not waiting or time.monotonic() >= deadline:
            return waiting
        time.sleep(0.01)


def start_workers(loader: DataLoader, timeout: float = WORKER_START_TIMEOUT_S,
                  attempts: int = WORKER_START_ATTEMPTS) -> Iterator:
    """``iter(loader)``, having seen every worker it forked run Python code; a worker stuck in
    ``os.fork`` (see above) is killed and the workers forked again. Nothing was consumed from the
    discarded iterator and the batch sampler starts from its position at every ``iter``, so the
    batches are those a first clean start gives. A loader without workers, without
    ``worker_started`` slots, or whose persistent workers are already up: plain ``iter``."""
    started = getattr(loader, "worker_started", None)  # set by _loader where num_workers > 0
    if started is None or getattr(loader, "_iterator", None) is not None:  # workers already up: none forked
        return iter(loader)
    for attempt in range(1, attempts + 1):
        started[:] = [0] * len(started)
        it = iter(loader)
        stuck = _stuck_workers(it, started, timeout)
        if not stuck:
            return it
        pids = ", ".join(str(w.pid) for w in stuck)
        print(f"warning: DataLoader worker(s) {pids} ran no Python code {timeout:.0f} s after their fork (stuck "
              f"in os.fork: CPython gh-112275, fixed in 3.11.10/3.12.1; this is Python "
              f"{sys.version.split()[0]}); killed and forked again ({attempt}/{attempts})",
              file=sys.stderr, flush=True)
        # Off torch's list of this iterator's workers first: its SIGCHLD handler raises in this process
        # for a listed worker killed by a signal. Its shutdown then joins the rest the ordinary way.
        _remove_worker_pids(id(it))
        _set_worker_pids(id(it), tuple(w.pid for w in it._workers if w not in stuck))
        for w in stuck:
            os.kill(w.pid, signal.SIGKILL)
        shut_down_workers(loader)
    raise RuntimeError(f"DataLoader workers stayed stuck in os.fork at {attempts} starts ({timeout:.0f} s each): "
                       "upgrade Python to 3.11.10+ or 3.12.1+ (CPython gh-112275), or set data.num_workers=0")
