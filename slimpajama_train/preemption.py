"""Stop requests from the scheduler: SIGTERM (SLURM ``scancel``, preemption, a time limit without
``--signal``; Kubernetes) and SIGUSR1 (SLURM's ``--signal=USR1@120`` ahead of a time limit).

SLURM sends the signal to *every* process of the job, at any moment: during model build, while a
checkpoint loads (minutes at 7B), or mid-step. So the handler is installed first thing in
:func:`slimpajama_train.train.run`, before anything slow, and it only records the request; the
ranks agree on it at the next step boundary (one entry of a collective the step already makes) and
then save and exit for requeue. Loader workers ignore both signals (``data.py``).
"""
from __future__ import annotations

import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records the first stop signal this process receives; never raises inside the handler."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None

    def install(self) -> StopRequest:
        """Handle SIGTERM and SIGUSR1 from now on (only the main thread can install handlers)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def ignore_from_now(self) -> None:
        """Ignore SIGTERM and SIGUSR1 from now on: for a process that has saved and exits for requeue.

        A later signal has nothing left to stop (torchrun SIGTERMs the ranks still running as soon as
        the first one exits 75; a scheduler may repeat its signal), and while the interpreter shuts
        down, Python has put back the default action: the signal would kill the process and turn its
        exit status 75 into -15. An ignored signal stays ignored through that shutdown.
        """
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def describe(self) -> str:
        if self.signum is None:
            return "no stop signal"
        ago = time.monotonic() - (self.received_at or time.monotonic())
        return f"{signal.Signals(self.signum).name} received {ago:.1f} s ago"
