"""Task execution: every stage runs as task ``i`` of ``n``, in a local process pool or as SLURM array tasks.

A finished task writes a completion marker ``<work>/markers/<stage>/<i>-of-<n>.json`` holding the
stage's config hash and the task's result; a re-run skips tasks whose marker matches. All outputs
are written under temporary names and renamed, so a killed task leaves nothing half-written.
"""
from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from data_prep.atomic import write_json


class Marker:
    """Completion marker of one task of one stage."""

    def __init__(self, work: Path, stage: str, index: int, num_tasks: int, cfg_hash: str) -> None:
        self.path = work / "markers" / stage / f"{index:05d}-of-{num_tasks:05d}.json"
        self.stage, self.index, self.num_tasks, self.cfg_hash = stage, index, num_tasks, cfg_hash

    def result(self) -> dict[str, Any] | None:
        """The stored result when this task finished with the same config, else None."""
        if not self.path.is_file():
            return None
        marker = json.loads(self.path.read_text())
        return marker["result"] if marker.get("config_hash") == self.cfg_hash else None

    def complete(self, result: dict[str, Any]) -> None:
        write_json(self.path, {"config_hash": self.cfg_hash, "result": result})


def stage_results(work: Path, stage: str, num_tasks: int, cfg_hash: str) -> list[dict[str, Any]]:
    """Results of all tasks of a finished stage; raises naming the missing tasks otherwise."""
    results, missing = [], []
    for i in range(num_tasks):
        r = Marker(work, stage, i, num_tasks, cfg_hash).result()
        if r is None:
            missing.append(i)
        results.append(r)
    if missing:
        raise RuntimeError(
            f"stage {stage!r} has not finished: tasks {missing} of {num_tasks} have no matching completion marker "
            f"under {work / 'markers' / stage} (run it first, with the same config and num_tasks)"
        )
    return results  # type: ignore[return-value]


def run_tasks(fn: Callable[[int, int], dict[str, Any]], num_tasks: int, workers: int) -> None:
    """Run ``fn(i, num_tasks)`` for every task, ``workers`` at a time in a process pool (inline for 1).

    ``fn`` must be picklable (a module-level function or a functools.partial of one).
    """
    if num_tasks == 1 or workers <= 1:
        for i in range(num_tasks):
            fn(i, num_tasks)
        return
    # forkserver, not fork: a forked child of a process whose thread pools already ran (rensa's
    # rayon pool, SentencePiece) can deadlock. The server preloads the stage modules once, so each
    # worker still starts without re-importing them.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["data_prep.stages", "data_prep.dedup_tasks", "numpy", "sentencepiece", "rensa",
                                 "scipy.sparse.csgraph"])
    with ProcessPoolExecutor(max_workers=min(workers, num_tasks), mp_context=ctx) as pool:
        futures = [pool.submit(fn, i, num_tasks) for i in range(num_tasks)]
        for f in futures:
            f.result()  # re-raises the task's exception here
