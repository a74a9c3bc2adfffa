"""DataLoader workers that outlive the scheduler's preemption signals and are shut down before exit."""
from __future__ import annotations

import atexit
import os
import signal
import threading
import weakref

from torch.utils.data import DataLoader


def ignore_preemption_signals(_: int, loader_pid: int | None = None) -> None:
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
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
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
