"""The prep report: SlimPajama's retention table per stage and per source, as JSON, Markdown and PNG,
and the bad-input summary the report stage also prints."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from data_prep.atomic import atomic_path, write_json, write_text
from data_prep.readers import BAD_INPUT_KINDS
from data_prep.stats import MAX_LISTED, PrepStats

MD_LISTED = 200  # bad records and files listed in prep_report.md
CONSOLE_LISTED = 10  # files listed on the console


def more(total: int, shown: int, where: str = "", markdown: bool = False) -> list[str]:
    """The note a truncated list ends with ("... and 11,611 more"), or nothing when it is complete.
    In Markdown it is a paragraph of its own (a line right after a list item would continue it)."""
    if total <= shown:
        return []
    return [*([""] if markdown else []), f"... and {total - shown:,} more{where}"]


def bad_input(sd: dict[str, Any], input_files: int | None = None) -> dict[str, Any]:
    """The bad-input summary: counts per kind, the files no document was read from (a sample of at most
    MAX_LISTED, with the total) and how many bad records there were and are listed."""
    read = next((s for s in sd["steps"] if s["step"] == "read"), {"drop_reasons": {}})
    counts = {k: read["drop_reasons"][k] for k in BAD_INPUT_KINDS if k in read["drop_reasons"]}
    counts.update({k: n for k, n in read["drop_reasons"].items() if k not in counts})
    return {"counts": counts, "records": sd.get("errors_total", len(sd["errors"])), "records_listed": len(sd["errors"]),
            "files": sd.get("bad_files", []), "files_total": sd.get("bad_files_total", 0), "input_files": input_files}


def nothing_read(clean_results: list[dict[str, Any]]) -> str | None:
    """The error to stop with when no input file gave a single document (every one unreadable, empty
    or garbage): the bad-input summary. None when some document was read."""
    stats = PrepStats()
    for r in clean_results:
        stats.merge(PrepStats.from_dict(r["stats"]))
    sd = stats.to_dict()
    read = next((s for s in sd["steps"] if s["step"] == "read"), {"total": {}})
    if read["total"].get("docs_out", 0):
        return None
    files = clean_results[0].get("total_files") if clean_results else None
    lines = bad_input_lines(bad_input(sd, files))
    return "\n".join([f"no document could be read from any of the {files} input files (prep.inputs):", *lines])


def bad_input_lines(summary: dict[str, Any], listed: int = CONSOLE_LISTED) -> list[str]:
    """The bad-input summary as console lines: one line when there is none."""
    n_files = f" of {summary['input_files']:,}" if summary.get("input_files") is not None else ""
    if not summary["counts"] and not summary["files_total"]:
        return [f"input: no bad input ({summary['input_files'] or 'all'} files read in full)"]
    lines = [f"input: {summary['records']:,} bad records or files; {summary['files_total']:,}{n_files} files gave "
             "no document"]
    lines += [f"  {k:<18} {n:>12,}  {BAD_INPUT_KINDS.get(k, '')}" for k, n in summary["counts"].items()]
    if summary["files_total"]:
        lines.append("  files no document was read from:")
        shown = summary["files"][:listed]
        lines += [f"    {f['file']}: {f['reason']}" for f in shown]
        lines += ["    " + m for m in more(summary["files_total"], len(shown), " (see prep_report.md)")]
    return lines


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
                 decontam: dict[str, Any] | None = None, input_files: int | None = None) -> dict[str, Any]:
    """Write ``prep_report.json``, ``prep_report.md``, ``prep_report.png`` and ``prep_stats.json``.
    ``input_files`` is the number of input files (the bad-input summary says how many gave nothing)."""
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
        "bad_input": bad_input(sd, input_files),
        "errors": sd["errors"],  # the first MAX_LISTED bad records; bad_input.records counts them all
        "skipped_files": [e for e in sd.get("bad_files", []) if e["reason"].startswith("skipped:")],
        "error_counts": {s["step"]: s["drop_reasons"] for s in sd["steps"] if s["step"] == "read"},
        "timings": timings,
        "stage_time": stage_time or {},
        "tokenizer": tokenizer,
        "mixture": {name: {"factors": sp.get("mixture_factors"), "proportions": sp["proportions"],
                           "per_shard": [e.get("proportions") for e in sp["shards"]]}
                    for name, sp in manifest["splits"].items()},
    }
    write_json(out / "prep_stats.json", {k: sd[k] for k in ("steps", "errors", "errors_total", "bad_files",
                                                            "bad_files_total", "timings")})
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
        skipped = report.get("bad_input", {}).get("counts", {}).get("unsupported_file", len(report["skipped_files"]))
        shown = report["skipped_files"][:MD_LISTED]
        lines += ["", f"## Skipped input files ({skipped})", ""]
        lines += [f"- `{e['file']}`: {e['reason']}" for e in shown]
        lines += more(skipped, len(shown), markdown=True)
    lines += bad_input_markdown(report)
    return "\n".join(lines) + "\n"


def bad_input_markdown(report: dict[str, Any]) -> list[str]:
    """The Bad input section: counts per kind, the files nothing was read from, the first bad records."""
    b = report.get("bad_input") or {"counts": {}, "records": len(report["errors"]), "files": [], "files_total": 0}
    lines = ["", f"## Bad input ({b['records']} records)", ""]
    if b["counts"]:
        lines += ["| kind | count | what |", "|---|---:|---|"]
        lines += [f"| {k} | {n} | {BAD_INPUT_KINDS.get(k, '')} |" for k, n in b["counts"].items()]
    if b["files_total"]:
        shown = b["files"][:MD_LISTED]
        lines += ["", f"### Files no document was read from ({b['files_total']})", ""]
        lines += [f"- `{f['file']}`: {f['reason']}" for f in shown]
        lines += more(b["files_total"], len(shown), f" (prep_report.json lists up to {MAX_LISTED})", markdown=True)
    if report["errors"]:
        shown = report["errors"][:MD_LISTED]
        lines += ["", "### Bad records", ""]
        lines += [f"- `{e['file']}`:{e['line']}: {e['reason']}" for e in shown]
        lines += more(b["records"], len(shown), f" (prep_report.json lists the first {len(report['errors'])}; "
                                               "every one is counted in the table above)", markdown=True)
    return lines


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

