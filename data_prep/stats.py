"""Documents and bytes in/out per step and per source: SlimPajama's retention table.

Bad input is counted per kind (the read step's drop reasons) and listed with file and line, but the
list is a sample: at most :data:`MAX_LISTED` records and :data:`MAX_LISTED` files per task and after
merging, with totals, so a corpus of a billion broken lines costs the same memory as a clean one.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from data_prep.document import Document

MAX_LISTED = 1000  # bad records (and files nothing was read from) kept with file and line; the rest are counted


class PrepStats:
    """Counters keyed by (step, source); plus free-form drop reasons and notes per step."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
        self.reasons: dict[str, Counter] = defaultdict(Counter)
        self.notes: dict[str, Counter] = defaultdict(Counter)
        self.errors: list[dict[str, Any]] = []  # the first MAX_LISTED of errors_total
        self.errors_total = 0
        self.bad_files: list[dict[str, Any]] = []  # files no document was read from (first MAX_LISTED)
        self.bad_files_total = 0
        self.timings: Counter = Counter()
        self._order: list[str] = []

    def _touch(self, step: str) -> None:
        if step not in self._order:
            self._order.append(step)

    def add(self, step: str, source: str, key: str, docs: int, nbytes: int) -> None:
        self._touch(step)
        c = self._counts[step][source]
        c[f"docs_{key}"] += docs
        c[f"bytes_{key}"] += nbytes

    def drop(self, step: str, reason: str, n: int = 1) -> None:
        self._touch(step)
        self.reasons[step][reason] += n

    def note(self, step: str, what: str, n: int = 1) -> None:
        """Count something ``step`` did that is not a drop (e.g. texts ftfy changed)."""
        self._touch(step)
        self.notes[step][what] += n

    def add_time(self, step: str, seconds: float) -> None:
        """Seconds spent inside ``step`` (the report turns them into MB/s)."""
        self.timings[step] += seconds

    def merge(self, other: PrepStats) -> None:
        """Add ``other``'s counters to these (tasks of one stage are merged in task order)."""
        for step in other._order:
            self._touch(step)
            for src, c in other._counts[step].items():
                self._counts[step][src].update(c)
            self.reasons[step].update(other.reasons.get(step, {}))
            self.notes[step].update(other.notes.get(step, {}))
        self.errors.extend(other.errors[: MAX_LISTED - len(self.errors)])
        self.errors_total += other.errors_total
        self.bad_files.extend(other.bad_files[: MAX_LISTED - len(self.bad_files)])
        self.bad_files_total += other.bad_files_total
        self.timings.update(other.timings)

    def error(self, file: str, line: int | None, reason: str) -> None:
        """Record one bad record (or file) of the input; listed while fewer than MAX_LISTED are."""
        self.errors_total += 1
        if len(self.errors) < MAX_LISTED:
            self.errors.append({"file": file, "line": line, "reason": reason})

    def bad_file(self, file: str, reason: str) -> None:
        """Record an input file no document was read from (unreadable, empty, garbage, no reader)."""
        self.bad_files_total += 1
        if len(self.bad_files) < MAX_LISTED:
            self.bad_files.append({"file": file, "reason": reason})

    def count(self, step: str, docs: Iterable[Document], key: str) -> Iterator[Document]:
        """Pass documents through unchanged while counting them as ``key`` ("in" or "out") of ``step``."""
        for doc in docs:
            self.add(step, doc.source, key, 1, doc.nbytes)
            yield doc

    def to_dict(self) -> dict[str, Any]:
        steps = []
        for step in self._order:
            per_source = {src: dict(c) for src, c in sorted(self._counts[step].items())}
            total: Counter = Counter()
            for c in self._counts[step].values():
                total.update(c)
            steps.append(
                {
                    "step": step,
                    "total": dict(total),
                    "per_source": per_source,
                    "drop_reasons": dict(self.reasons.get(step, {})),
                    "notes": dict(self.notes.get(step, {})),
                }
            )
        return {"steps": steps, "errors": self.errors, "errors_total": self.errors_total, "bad_files": self.bad_files,
                "bad_files_total": self.bad_files_total, "timings": {k: round(v, 4) for k, v in self.timings.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrepStats:
        """Rebuild from :meth:`to_dict` output (stages that were skipped on re-run report from their marker)."""
        stats = cls()
        for entry in data["steps"]:
            stats._touch(entry["step"])
            for src, c in entry["per_source"].items():
                stats._counts[entry["step"]][src].update(c)
            stats.reasons[entry["step"]].update(entry.get("drop_reasons", {}))
            stats.notes[entry["step"]].update(entry.get("notes", {}))
        stats.errors = list(data.get("errors", []))
        stats.errors_total = data.get("errors_total", len(stats.errors))
        stats.bad_files = list(data.get("bad_files", []))
        stats.bad_files_total = data.get("bad_files_total", len(stats.bad_files))
        stats.timings.update(data.get("timings", {}))
        return stats

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    def markdown(self) -> str:
        """The retention table as Markdown."""
        lines = [
            "| step | source | docs in | docs out | bytes in | bytes out | kept bytes % |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for entry in self.to_dict()["steps"]:
            rows = list(entry["per_source"].items()) + [("**all**", entry["total"])]
            for src, c in rows:
                bin_, bout = c.get("bytes_in", 0), c.get("bytes_out", 0)
                pct = f"{100.0 * bout / bin_:.1f}" if bin_ else "-"
                lines.append(
                    f"| {entry['step']} | {src} | {c.get('docs_in', 0)} | {c.get('docs_out', 0)} "
                    f"| {bin_} | {bout} | {pct} |"
                )
        return "\n".join(lines) + "\n"
