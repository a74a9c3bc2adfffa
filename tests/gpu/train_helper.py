"""Test helper: the trainer as ``slimpajama_train.train.run`` drives it, configured by ``key=value``
overrides of :class:`~slimpajama_train.config.TrainConfig` fields, without Hydra (the GPU host has no
hydra-core/omegaconf). Run directly (one process) or under torchrun.

    python tests/gpu/train_helper.py [--sync-debug] [--kill-at STEP --kill-rank R --kill-signal SIGUSR1]
        [--pid-dir DIR] data.path=... run_dir=... backend.always_shard=true trainer.max_steps=8 ...

- ``--sync-debug``: :class:`SyncDebug`: ``torch.cuda.set_sync_debug_mode("error")`` around every
  step that is not a log, eval or checkpoint step, so any implicit host-device synchronization there
  raises; the explicit ones, which that mode lets pass (``Event.synchronize``, ``Stream.synchronize``,
  ``torch.cuda.synchronize``), are counted there, by caller, into the summary.
- ``--kill-at S``: rank ``--kill-rank`` sends itself ``--kill-signal`` once step S is done (as SLURM
  signals a job); the ranks must vote, save and exit for requeue. (Not ``--signal*``: torchrun's
  parser would take that for an abbreviation of its ``--signals-to-handle``.)
- ``--pid-dir``: each rank writes ``rank<R>.pid`` there (so a test can signal the ranks themselves).

Exit status 75 after a stop request, as ``slimpajama-train``; rank 0 prints the summary as a JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from slimpajama_train.preemption import StopRequest  # noqa: E402 - after the sys.path insert above

# As train.py: run as a script, the handler goes in before the heavy imports, so an early signal is
# recorded (imported, e.g. by a test of this module, it installs nothing).
_STOP = StopRequest().install() if __name__ == "__main__" else None

import torch  # noqa: E402
import yaml  # noqa: E402

from slimpajama_train.callbacks.base import Callback  # noqa: E402
from slimpajama_train.callbacks.build import build_callbacks  # noqa: E402
from slimpajama_train.config import TrainConfig  # noqa: E402
from slimpajama_train.distributed import destroy_distributed, init_distributed  # noqa: E402
from slimpajama_train.trainer import Trainer  # noqa: E402

PREEMPTED_EXIT_CODE = 75


def _value(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string; Hydra reads it as a float
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _build(cls, values: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise SystemExit(f"train_helper: {cls.__name__} has no field {key!r}")
        hint = hints[key]
        kwargs[key] = _build(hint, value) if dataclasses.is_dataclass(hint) and isinstance(value, dict) else value
    return cls(**kwargs)


def config_from_overrides(overrides: list[str]) -> TrainConfig:
    """``a.b=c`` overrides (values parsed as YAML) applied to TrainConfig's defaults."""
    tree: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"train_helper: override {item!r} is not key=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _value(text)
    return _build(TrainConfig, tree)


class SyncDebug(Callback):
    """``torch.cuda.set_sync_debug_mode("error")`` from the start of every step that is neither a log,
    an eval nor a checkpoint step until the start of the next step; "default" around the others.
    ``trainer.step`` is the number of steps done, so the coming step is ``trainer.step + 1``.

    The error mode catches implicit synchronizations (``.item()``, blocking copies) but not the
    explicit waits of :data:`EXPLICIT`, so in the same windows those are counted, by caller
    (``explicit_syncs``, "file:line name" -> calls): an ``Event.synchronize`` per step keeps the host
    at most one step ahead of the GPU as surely as an ``.item()``."""

    name = "sync_debug"
    priority = 1000  # first: the other callbacks' on_step_start run under the mode set here
    EXPLICIT = ((torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "synchronize"), (torch.cuda, "synchronize"))

    def __init__(self) -> None:
        self.error_steps: list[int] = []
        self.explicit_syncs: dict[str, int] = {}
        self.quiet = False
        self._saved: list[tuple] = []

    def on_train_start(self, trainer) -> None:
        for owner, name in self.EXPLICIT:
            fn = getattr(owner, name)
            self._saved.append((owner, name, fn))
            setattr(owner, name, self._counting(f"{getattr(owner, '__name__', owner)}.{name}", fn))

    def _counting(self, what: str, fn):
        def counted(*args, **kwargs):
            if self.quiet:
                caller = sys._getframe(1)
                key = f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {what}"
                self.explicit_syncs[key] = self.explicit_syncs.get(key, 0) + 1
            return fn(*args, **kwargs)
        return counted

    def on_step_start(self, trainer) -> None:
        nxt, loop, ckpt = trainer.step + 1, trainer.cfg.trainer, trainer.cfg.checkpoint
        self.quiet = not (nxt % loop.log_interval == 0 or nxt == 1 or nxt == loop.max_steps
                          or (loop.eval_interval and nxt % loop.eval_interval == 0)
                          or (ckpt.interval and nxt % ckpt.interval == 0))
        torch.cuda.set_sync_debug_mode("error" if self.quiet else "default")
        if self.quiet:
            self.error_steps.append(nxt)

    def on_train_end(self, trainer) -> None:
        self.quiet = False
        torch.cuda.set_sync_debug_mode("default")
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()


class SelfSignal(Callback):
    """Rank ``rank`` sends itself ``sig`` once step ``step`` is done (at the start of the next step:
    ``on_step_start`` runs every step, ``on_step_end`` only on log steps)."""

    name = "self_signal"

    def __init__(self, step: int, rank: int, sig: int, my_rank: int) -> None:
        self.step, self.rank, self.sig, self.my_rank = step, rank, sig, my_rank

    def on_step_start(self, trainer) -> None:
        if trainer.step == self.step and self.my_rank == self.rank:
            os.kill(os.getpid(), self.sig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sync-debug", action="store_true")
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--kill-rank", type=int, default=0)
    p.add_argument("--kill-signal", default="SIGUSR1", choices=["SIGUSR1", "SIGTERM"])
    p.add_argument("--pid-dir", default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = config_from_overrides(a.overrides)
    dist_info = init_distributed(cfg.dist)
    if a.pid_dir:
        Path(a.pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(a.pid_dir) / f"rank{dist_info.rank}.pid").write_text(str(os.getpid()))
    extra: list[Callback] = []
    sync_debug = SyncDebug() if a.sync_debug else None
    if sync_debug is not None:
        if dist_info.device.type != "cuda":
            raise SystemExit("train_helper: --sync-debug needs a CUDA device")
        extra.append(sync_debug)
    if a.kill_at is not None:
        extra.append(SelfSignal(a.kill_at, a.kill_rank, getattr(signal, a.kill_signal), dist_info.rank))
    trainer, clean, summary = None, False, {}
    try:
        trainer = Trainer(cfg, dist_info, callbacks=build_callbacks(cfg.logger, dist_info.is_main) + extra,
                          stop=_STOP or StopRequest().install())
        summary = trainer.fit()
        if sync_debug is not None:
            summary["sync_debug_error_steps"] = sync_debug.error_steps
            summary["explicit_syncs_on_quiet_steps"] = sync_debug.explicit_syncs
        if dist_info.is_main:
            print(json.dumps(summary), flush=True)
        clean = True
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed(barrier=clean)
    return PREEMPTED_EXIT_CODE if summary.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(main())
