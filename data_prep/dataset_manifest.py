"""The report stage: the dataset's manifest (the contract with the trainer) and the prep report."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from data_prep.atomic import write_json
from data_prep.holdout import SPLITS
from data_prep.mixture import realized
from data_prep.plan import SplitPlan
from data_prep.stats import PrepStats

if TYPE_CHECKING:
    from data_prep.stages import Context


def split_summary(ctx: Context, name: str) -> dict[str, Any]:
    """A split's manifest entry: its shards' entries and totals, mixture factors and dropped tail."""
    plan = SplitPlan.load(ctx.work, name)
    entries = [json.loads(ctx.work.shard_entry(name, s).read_text()) for s in range(plan.shards)]
    per_source: dict[str, int] = {}
    for e in entries:
        for k, v in e["tokens_per_source"].items():
            per_source[k] = per_source.get(k, 0) + v
    # Shards of an earlier run with more shards than this one are not part of the dataset.
    for stale in ctx.out.glob(f"{name}-*.tar"):
        if int(stale.stem.split("-")[1]) >= plan.shards:
            stale.unlink()
    return {
        "shards": entries,
        "samples": sum(e["samples"] for e in entries),
        "tokens": sum(e["tokens"] for e in entries),
        "bytes": sum(e["bytes"] for e in entries),
        "tokens_per_source": dict(sorted(per_source.items())),
        "proportions": realized(per_source),
        "tail_tokens_dropped": int(plan.cum[-1]) - plan.blocks * ctx.cfg.block_size,
        "mixture_factors": {k: round(v, 6) for k, v in sorted(plan.factors.items())},
        "tokens_available": plan.tokens_available,
    }


def write_manifest_and_report(ctx: Context, earlier: list[tuple[str, bool]], h: dict[str, str]) -> dict[str, Any]:
    """manifest.json (written last: its presence means the dataset is complete), prep_report.{json,md,png}
    and prep_stats.json, from the results of the ``earlier`` stages ((name, parallel) in order)
    whose config hashes are ``h``."""
    from data_prep.retention_report import bad_input_lines, write_report
    from data_prep.shard_format import FORMAT_VERSION, MANIFEST, RecordLayout, token_dtype
    from data_prep.tasks import stage_results

    cfg = ctx.cfg
    res = {name: stage_results(ctx.work.root, name, ctx.n if parallel else 1, h[name]) for name, parallel in earlier}
    tok = res["tokenizer"][0]
    dtype = token_dtype(tok["vocab_size"])
    splits = {name: split_summary(ctx, name) for name in SPLITS}
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {k: v for k, v in tok.items() if k not in ("training", "cpu_s", "wall_s")},
        "seq_len": cfg.seq_len,
        "block_size": cfg.block_size,
        "dtype": dtype.name,
        "record": RecordLayout.for_block(cfg.block_size, dtype).__dict__,
        "splits": splits,
        "totals": {k: sum(s[k] for s in splits.values()) for k in ("samples", "tokens", "bytes")},
        "prep_config": cfg.data_dict(),
        "prep_config_hash": h["shards"],
    }
    stats = PrepStats()
    for stage in ("clean", "split", "tokenize"):
        for r in res[stage]:
            stats.merge(PrepStats.from_dict(r["stats"]))
    sig0 = res["signatures"][0] if res["signatures"] else {}
    dedup = {
        "bands_rows": [sig0["bands"], sig0["rows"]] if sig0 else None,
        "candidate_pairs": sum(r["candidate_pairs"] for r in res["buckets"]),
        "verified_pairs": sum(r["verified_pairs"] for r in res["buckets"]),
        "removed": res["components"][0]["removed"],
        "clusters": res["components"][0]["clusters"],
        "forest_edges": res["components"][0]["forest_edges"],
    }
    stage_time = {s: {"cpu_s": round(sum(r.get("cpu_s", 0) for r in rs), 3),
                      "wall_s": round(sum(r.get("wall_s", 0) for r in rs), 3), "tasks": len(rs)}
                  for s, rs in res.items()}
    decontam = None
    if "eval_examples" in sig0:
        decontam = {"eval_examples": sig0["eval_examples"], "eval_examples_too_short": sig0["eval_examples_too_short"],
                    "ngram": cfg.decontam.ngram, "min_words": cfg.decontam.min_words}
    report = write_report(ctx.out, stats, manifest, dedup, tok.get("training", {}), stage_time, decontam,
                          input_files=res["clean"][0].get("total_files"))
    lines = bad_input_lines(report["bad_input"])
    if report["bad_input"]["counts"]:
        lines.append(f"  every good document was kept; {ctx.out / 'prep_report.md'} lists the bad input")
    print("\n".join(lines), flush=True)  # on the console (or the SLURM log)
    write_json(ctx.out / MANIFEST, manifest)
    return {"manifest": MANIFEST}
