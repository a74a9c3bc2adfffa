"""``slimpajama-prep``: raw corpora -> clean, deduplicated, mixed, split, tokenized WebDataset shards.

Stages (declared in ``data_prep/stages.py``), each run as task ``i`` of ``n`` with a completion
marker per task:

==============  =====  =====================================================================
stage           tasks  what
==============  =====  =====================================================================
clean           n      read files i, i+n, ...; NFC (or ftfy); short-document + quality filters
signatures      n      document table; MinHash signatures; band records spilled to n buckets
buckets         n      candidate pairs of bucket shard i; exact-Jaccard verification; forest
components      1      connected components (scipy); keeper = first in input order
removals        n      removed.jsonl records of part i (ids, kept ids, Jaccard)
split           1      removed.jsonl merged; holdout (ratio or count); hash + n-gram decontamination
tokenizer       1      SentencePiece on a mixture-weighted reservoir sample (or copy a .model)
tokenize        n      encode part i (one process per task)
plan            1      the token stream of each split: documents in input order, mixture repeats
shards          n      fixed-size shards i, i+n, ... of the planned streams; sha256 each
report          1      manifest.json, prep_report.{json,md,png}
==============  =====  =====================================================================

Usage::

    slimpajama-prep                                     # the demo corpus, one task (conf/prep.yaml)
    python -m data_prep.prep run.num_tasks=8 run.workers=8 \
        'inputs=[train/chunk*/example_train_*.jsonl.zst]' input_root=/data/SlimPajama \
        output_dir=/data/shards prep_mixture=slimpajama tokenizer=bpe_32k seq_len=2048
    # one task of one stage (what launch/slurm/prep.sbatch runs for each array index):
    python -m data_prep.prep run.stage=signatures run.task_index=3 run.num_tasks=8 ...
"""
from __future__ import annotations

import os
import resource
import sys
import time
from functools import partial
from typing import Any

from data_prep.cli import ConfigError
from data_prep.config import PrepConfig
from data_prep.stages import STAGE_BY_NAME, STAGES, Context, clear_outputs, stage_hashes
from data_prep.tasks import Marker, run_tasks


def run_task(cfg: PrepConfig, stage: str, index: int) -> dict[str, Any]:
    """Run task ``index`` of ``stage`` unless its completion marker says it already ran with this config."""
    spec = STAGE_BY_NAME.get(stage)
    if spec is None:
        raise ConfigError(f"run.stage={stage}: expected 'all' or one of {', '.join(s.name for s in STAGES)}")
    n = cfg.run.num_tasks if spec.parallel else 1
    if not 0 <= index < n:
        raise ConfigError(f"run.task_index={index}: stage {stage!r} has {n} task(s) "
                          f"(run.num_tasks={cfg.run.num_tasks})")
    ctx = Context(cfg)
    marker = Marker(ctx.work.root, stage, index, n, stage_hashes(cfg)[stage])
    done = None if cfg.run.force else marker.result()
    if done is not None and spec.stale is not None and (why := spec.stale(ctx, index, done)):
        print(f"prep: {stage} task {index} re-runs: {why}", file=sys.stderr)
        done = None
    if done is not None:
        return done
    # Compiled MinHash and SentencePiece must not start their own thread pools inside a task:
    # parallelism comes from the tasks, and per-core figures stay honest.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    c0, w0 = _cpu(), time.perf_counter()
    result = spec.run(ctx, index)
    result["cpu_s"], result["wall_s"] = round(_cpu() - c0, 4), round(time.perf_counter() - w0, 4)
    marker.complete(result)
    return result


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _task(cfg: PrepConfig, stage: str, index: int, num_tasks: int) -> dict[str, Any]:
    return run_task(cfg, stage, index)


def run_prep(cfg: PrepConfig) -> dict[str, Any]:
    """Run every stage in order on a local process pool (finished tasks are skipped); return the manifest.

    With ``workers > 1`` the tasks run in ``forkserver`` processes: a script calling this needs the
    usual ``if __name__ == "__main__":`` guard.
    """
    from data_prep.shard_format import load_manifest

    if cfg.run.force:
        clear_outputs(cfg.local_out())
    run = cfg.run
    workers = run.workers if run.workers is not None else min(run.num_tasks, os.cpu_count() or 1)
    for stage in STAGES:
        run_tasks(partial(_task, cfg, stage.name), run.num_tasks if stage.parallel else 1, workers)
    return load_manifest(cfg.output_dir)


def main() -> None:
    """Hydra entry point: compose ``conf/prep.yaml`` with command-line overrides and run."""
    from data_prep.cli import hydra_cli, to_config
    from data_prep.config import register_configs

    register_configs()

    def _app(dcfg) -> None:
        cfg: PrepConfig = to_config(dcfg)
        run = cfg.run
        if run.stage != "all":
            index = run.task_index if run.task_index is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
            result = run_task(cfg, run.stage, index)
            scalars = ", ".join(f"{k}={v}" for k, v in result.items() if not isinstance(v, dict | list))
            print(f"stage {run.stage} task {index} done: {scalars}")
            return
        manifest = run_prep(cfg)
        t = manifest["totals"]
        shards = sum(len(s["shards"]) for s in manifest["splits"].values())
        print(f"wrote {t['samples']} samples / {t['tokens']} tokens in {shards} shards to {cfg.output_dir}")

    # A config error (unknown key, bad value) ends in two lines; HYDRA_FULL_ERROR=1 shows the traceback.
    hydra_cli("slimpajama-prep", "prep", _app)


if __name__ == "__main__":
    main()
