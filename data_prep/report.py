"""The prep report: SlimPajama's retention table per stage and per source, as JSON, Markdown and PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from data_prep.atomic import atomic_path, write_json, write_text
from data_prep.stats import PrepStats


def dedup_rate_by_source(stats: dict[str, Any]) -> dict[str, float]:
    """Fraction of bytes removed by exact + fuzzy dedup, per source."""
    steps = {s["step"]: s for s in stats["steps"]}
    if "exact_dedup" not in steps or "fuzzy_dedup" not in steps:
        return {}
    out = {}
    for src, c in steps["exact_dedup"]["per_source"].items():
        bin_ = c.get("bytes_in", 0)
        bout = steps["fuzzy_dedup"]["per_source"].get(src, {}).get("bytes_out", 0)
        out[src] = round(1 - bout / bin_, 6) if bin_ else 0.0
    return out


def retention_by_stage(stats: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Bytes out / bytes in per stage and source (the SlimPajama table)."""
    out: dict[str, dict[str, float]] = {}
    for s in stats["steps"]:
        row = {}
        for src, c in s["per_source"].items():
            if c.get("bytes_in"):
                row[src] = round(c.get("bytes_out", 0) / c["bytes_in"], 6)
        if row:
            out[s["step"]] = row
    return out


def write_report(out: Path, stats: PrepStats, manifest: dict[str, Any], dedup: dict[str, Any],
                 tokenizer: dict[str, Any], stage_time: dict[str, Any] | None = None,
                 decontam: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``prep_report.json``, ``prep_report.md``, ``prep_report.png`` and ``prep_stats.json``."""
    sd = stats.to_dict()
    read_bytes = sum(
        c.get("bytes_out", 0) for s in sd["steps"] if s["step"] == "read" for c in s["per_source"].values()
    )
    timings = {
        k: {"seconds": v, "mb_s": round(read_bytes / 1e6 / v, 2) if v else None} for k, v in sd["timings"].items()
    }
    report = {
        "steps": sd["steps"],
        "retention": retention_by_stage(sd),
        "dedup": {**dedup, "rate_by_source": dedup_rate_by_source(sd)},
        "decontam": decontam or {},
        "errors": sd["errors"],
        "skipped_files": [e for e in sd["errors"] if e["reason"].startswith("skipped:")],
        "error_counts": {s["step"]: s["drop_reasons"] for s in sd["steps"] if s["step"] == "read"},
        "timings": timings,
        "stage_time": stage_time or {},
        "tokenizer": tokenizer,
        "mixture": {name: {"factors": sp.get("mixture_factors"), "proportions": sp["proportions"],
                           "per_shard": [e.get("proportions") for e in sp["shards"]]}
                    for name, sp in manifest["splits"].items()},
    }
    write_json(out / "prep_stats.json", {"steps": sd["steps"], "errors": sd["errors"], "timings": sd["timings"]})
    write_json(out / "prep_report.json", report)
    write_text(out / "prep_report.md", markdown(stats, report))
    chart(out / "prep_report.png", report)
    return report


def markdown(stats: PrepStats, report: dict[str, Any]) -> str:
    lines = ["# Prep report", "", "## Retention per stage and source", "", stats.markdown(), "## Dedup", ""]
    d = report["dedup"]
    lines.append(f"bands x rows: {d.get('bands_rows')}; candidate pairs {d.get('candidate_pairs')}, verified "
                 f"{d.get('verified_pairs')}, removed {d.get('removed')}")
    lines += ["", "| source | dedup rate (bytes) |", "|---|---:|"]
    lines += [f"| {s} | {100 * r:.2f}% |" for s, r in d["rate_by_source"].items()]
    dc = report["decontam"]
    if dc:
        lines += ["", "## Decontamination", "",
                  f"evaluation examples {dc['eval_examples']}: matched by {dc['ngram']}-grams, or whole from "
                  f"{dc['min_words']} words; {dc['eval_examples_too_short']} shorter ones not checked"]
    lines += ["", "## Drop reasons", "", "| step | reason | documents |", "|---|---|---:|"]
    for s in report["steps"]:
        for reason, n in s["drop_reasons"].items():
            lines.append(f"| {s['step']} | {reason} | {n} |")
    notes = [(s["step"], k, n) for s in report["steps"] for k, n in s.get("notes", {}).items()]
    if notes:
        lines += ["", "## Notes (counted, nothing dropped)", "", "| step | what | count |", "|---|---|---:|"]
        lines += [f"| {step} | {k} | {n} |" for step, k, n in notes]
    lines += ["", "## Mixture (realized token proportions)", ""]
    for split, m in report["mixture"].items():
        lines.append(f"- {split}: factors {m['factors']}; realized {m['proportions']}")
    lines += ["", "## Time per step", "", "| step | seconds | MB/s of input |", "|---|---:|---:|"]
    for k, v in report["timings"].items():
        lines.append(f"| {k} | {v['seconds']:.3f} | {v['mb_s']} |")
    lines += ["", "## CPU time per stage (all tasks)", "",
              "| stage | tasks | CPU s | wall s (sum) |", "|---|---:|---:|---:|"]
    for k, v in report["stage_time"].items():
        lines.append(f"| {k} | {v['tasks']} | {v['cpu_s']:.2f} | {v['wall_s']:.2f} |")
    if report["skipped_files"]:
        lines += ["", f"## Skipped input files ({len(report['skipped_files'])})", ""]
        lines += [f"- `{e['file']}`: {e['reason']}" for e in report["skipped_files"]]
    lines += ["", f"## Bad input ({len(report['errors'])} records)", ""]
    for e in report["errors"][:200]:
        lines.append(f"- `{e['file']}`:{e['line']}: {e['reason']}")
    return "\n".join(lines) + "\n"


def chart(path: Path, report: dict[str, Any]) -> None:
    """Bar chart: bytes retained per stage (grouped by source) and dedup rate by source."""
    # The object API with the Agg canvas: no pyplot global state, no GUI backend, cheaper to import.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ret = report["retention"]
    stages = list(ret)
    sources = sorted({s for r in ret.values() for s in r})
    fig = Figure(figsize=(13, 4.5))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    width = 0.8 / max(1, len(sources))
    for k, src in enumerate(sources):
        ax1.bar([x + k * width for x in range(len(stages))], [100 * ret[s].get(src, 0) for s in stages], width,
                label=src)
    ax1.set_xticks([x + 0.4 - width / 2 for x in range(len(stages))], stages, rotation=30, ha="right")
    ax1.set_ylabel("bytes kept (%)")
    ax1.set_title("retention per stage")
    ax1.legend(fontsize=7)
    rate = report["dedup"]["rate_by_source"]
    ax2.bar(list(rate), [100 * v for v in rate.values()])
    ax2.set_ylabel("bytes removed by dedup (%)")
    ax2.set_title("dedup rate by source")
    ax2.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")

