"""Progress of long prep loops: a tqdm bar on a terminal, a log line every few seconds otherwise.

A SLURM log or a pipe is not a terminal, and a bar there is one ever-growing line of carriage
returns. Off a terminal, :class:`Progress` prints ``<desc>: 1,234,567 docs (4,321/s), 286 s`` at most
once every ``$SLIMPAJAMA_PROGRESS_S`` seconds (default 60), and a last line when the loop ends if it
printed any: at SlimPajama scale that is a handful of lines per task, not one per document. The cost
per item is one clock read.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

from tqdm import tqdm

INTERVAL_ENV = "SLIMPAJAMA_PROGRESS_S"
DEFAULT_INTERVAL_S = 60.0
T = TypeVar("T")


def interval_s() -> float:
    """Seconds between log lines off a terminal (``$SLIMPAJAMA_PROGRESS_S``)."""
    raw = os.environ.get(INTERVAL_ENV)
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        raise ValueError(f"${INTERVAL_ENV}={raw!r}: expected seconds between progress lines") from None
    if value <= 0:
        raise ValueError(f"${INTERVAL_ENV}={raw!r}: must be > 0")
    return value


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Counts items (``unit``) or, with ``unit=None``, only shows time passing.

    Args:
        desc: what is being done (``shards 3/64``).
        unit: what is counted (``doc``, ``block``); None for elapsed time only.
        total: the count at the end, when known.
        stream: where to write (stderr).
    """

    def __init__(self, desc: str, unit: str | None = "doc", total: int | None = None,
                 stream: IO[str] | None = None) -> None:
        self.desc, self.unit, self.total = desc, unit, total
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0
        self.start = self.last = time.monotonic()
        self.every = interval_s()
        self.printed = False
        self.bar: Any = None
        if _is_terminal(self.stream):
            self.bar = tqdm(desc=desc, unit=unit or "s", total=total, mininterval=1.0, dynamic_ncols=True,
                            file=self.stream, leave=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(now, "")

    def _line(self, now: float, suffix: str) -> None:
        elapsed = now - self.start
        secs = f"{elapsed:,.0f}" if elapsed >= 10 else f"{elapsed:.1f}"
        if self.unit is None:
            text = f"{self.desc}: {secs} s{suffix}"
        else:
            of = f" of {self.total:,}" if self.total is not None else ""
            rate = f" ({self.n / elapsed:,.0f}/s)" if elapsed > 0 else ""
            text = f"{self.desc}: {self.n:,}{of} {self.unit}s{rate}, {secs} s{suffix}"
        print(text, file=self.stream, flush=True)
        self.printed = True

    def close(self) -> None:
        """Remove the bar, or print a last line if the loop was long enough to print one before."""
        if self.bar is not None:
            self.bar.close()
        elif self.printed:
            self._line(time.monotonic(), ", done")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(iterable: Iterable[T], desc: str, unit: str = "doc", total: int | None = None) -> Iterator[T]:
    """``iterable``, with a :class:`Progress` of its items."""
    with Progress(desc, unit, total) as p:
        for item in iterable:
            yield item
            p.update()


class Heartbeat:
    """Shows that a long call that reports nothing (SentencePiece training) is still running: a thread
    ticks a :class:`Progress` of elapsed time once a second while the ``with`` block runs."""

    def __init__(self, desc: str) -> None:
        self.progress = Progress(desc, unit=None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.progress.every)):
            self.progress.update()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.progress.close()
