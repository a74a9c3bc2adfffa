"""``slimpajama-plot``: compare training runs side by side from their ``metrics.jsonl``.

Usage::

    slimpajama-plot runs/a runs/b --out comparison.png
    python -m slimpajama_train.tools.plot runs/a runs/b --out comparison.png --csv comparison.csv --names base,wide

One PNG with a panel each for train and validation loss, learning rate, tokens/s, MFU and the
validation loss of every source (``val_loss/<source>`` keys), all against tokens seen; and a CSV
(long format: run, panel, metric, step, x, y) with exactly the numbers that were drawn. Each run
keeps one colour in every panel.

:func:`plot_data` turns loaded runs into panels (titles, axis labels, series) and :func:`draw` only
draws what it is given, so a test can check the figure's content without looking at pixels.
"""
from __future__ import annotations

import argparse
import bisect
import csv
import io
import json
import math
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_prep.atomic import atomic_path, write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
SOURCE_PREFIX = "val_loss/"  # per-source validation loss keys: val_loss/<source>
LOSS_LABEL = "cross-entropy (nats/token)"


@dataclass
class Run:
    """One run_dir as read: one record per step (ascending) and its resolved config, if any."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Series:
    """One line: ``name`` is its legend entry, ``metric`` the metrics.jsonl key it came from."""

    name: str
    run: str
    metric: str
    steps: list[int]
    x: list[float]
    y: list[float]


@dataclass
class Panel:
    """One axes. ``note`` replaces the lines when there are none; ``missing`` names runs without data."""

    key: str
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    note: str | None = None
    missing: list[str] = field(default_factory=list)


@dataclass
class PlotData:
    """Everything :func:`draw` and :func:`write_csv` need."""

    title: str
    runs: list[str]
    panels: list[Panel]
    x_is_tokens: bool
    notes: list[str] = field(default_factory=list)

    def panel(self, key: str) -> Panel:
        return next(p for p in self.panels if p.key == key)


# ---- reading run_dirs ---------------------------------------------------------------------------
def read_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a metrics file, one per step (the last one wins), and notes on skipped lines.

    A run still writing can end in a partial line, and an attempt killed mid-write leaves one that
    the resumed attempt appended to; both are skipped, and said so. A resumed run rewrites the steps
    after its checkpoint, hence "last record wins" (as tests/conftest.py's losses_by_step).
    """
    raw = path.read_bytes()  # one read: a run appending meanwhile cannot shift lines under us
    lines = raw.split(b"\n")
    by_step: dict[int, dict[str, Any]] = {}
    bad: list[int] = []
    truncated_tail = False
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError):
            if i == len(lines) and not raw.endswith(b"\n"):
                truncated_tail = True
            else:
                bad.append(i)
            continue
        by_step[step] = rec
    notes = []
    if truncated_tail:
        notes.append(f"{path}: skipped a truncated last line (the run is still writing, or was killed mid-write)")
    if bad:
        notes.append(f"{path}: skipped {len(bad)} unreadable line(s) (first: line {bad[0]}; "
                     "an attempt killed mid-write, then resumed)")
    return [by_step[s] for s in sorted(by_step)], notes


def load_run(run_dir: Path | str, name: str | None = None) -> Run:
    """Read ``run_dir/metrics.jsonl`` (required) and ``run_dir/config.json`` (optional).

    The name is ``name``, else the config's ``logger.wandb.name``, else the directory's name.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        what = "no such directory" if not run_dir.is_dir() else f"the directory has no {METRICS_FILE}"
        raise FileNotFoundError(f"{metrics}: not found ({what}; is {run_dir} a run_dir with logger.metrics_file=true?)")
    records, notes = read_records(metrics)
    config = None
    if (run_dir / CONFIG_FILE).is_file():
        try:
            raw = json.loads((run_dir / CONFIG_FILE).read_text())
            config = raw.get("config", raw)  # the trainer writes {"config_hash", "config"}
        except ValueError:
            notes.append(f"{run_dir / CONFIG_FILE}: not valid JSON; ignored")
    if not records:
        notes.append(f"{metrics}: no records yet")
    name = name or _get(config, "logger", "wandb", "name") or run_dir.resolve().name
    return Run(name=str(name), path=run_dir, records=records, config=config, notes=notes)


def load_runs(run_dirs: list[Path | str], names: list[str] | None = None) -> list[Run]:
    """Load several runs; names that clash (two ``.../run`` dirs) get their parent directory too."""
    if names is not None and len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} name(s) for {len(run_dirs)} run_dir(s): give one name per run_dir")
    runs = [load_run(d, names[i] if names else None) for i, d in enumerate(run_dirs)]
    seen = [r.name for r in runs]
    for r in runs:
        if seen.count(r.name) > 1 and names is None:
            r.name = "/".join(r.path.resolve().parts[-2:])
    if len({r.name for r in runs}) < len(runs):
        raise ValueError(f"run names must differ, got {[r.name for r in runs]}; pass --names")
    return runs


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


# ---- tokens seen --------------------------------------------------------------------------------
def tokens_of_step(run: Run) -> tuple[Callable[[int], float] | None, str | None]:
    """A step -> tokens-seen function and where it comes from (``"metrics"``, ``"config"`` or None).

    Train-log records carry ``tokens_seen``; evaluation-only records (step 0, eval steps between
    log steps) do not, so their tokens are interpolated between the recorded ones (exact while the
    batch is constant, and it follows a batch size changed on resume).
    """
    anchors = sorted((int(r["step"]), float(r["tokens_seen"])) for r in run.records
                     if isinstance(r.get("tokens_seen"), int | float))
    if anchors:
        if anchors[0][0] > 0:
            anchors.insert(0, (0, 0.0))
        steps = [s for s, _ in anchors]
        toks = [t for _, t in anchors]
        last_rate = toks[-1] / steps[-1] if steps[-1] else 0.0

        def from_metrics(step: int) -> float:
            i = bisect.bisect_left(steps, step)
            if i < len(steps) and steps[i] == step:
                return toks[i]
            if i == len(steps):  # past the last train log (a run in progress): same rate on
                return toks[-1] + (step - steps[-1]) * last_rate
            s0, s1, t0, t1 = steps[i - 1], steps[i], toks[i - 1], toks[i]
            return t0 + (t1 - t0) * (step - s0) / (s1 - s0)

        return from_metrics, "metrics"
    batch = _get(run.config, "trainer", "global_batch_size")
    seq_len = _get(run.config, "model", "max_seq_len")  # the resolved config: the data's seq_len
    if isinstance(batch, int) and isinstance(seq_len, int):
        return (lambda step: float(step * batch * seq_len)), "config"
    return None, None


def _x_axis(runs: list[Run]) -> tuple[dict[str, Callable[[int], float]], str, bool]:
    """Per run, step -> x; the x label naming where tokens came from; whether x is tokens at all."""
    found = {r.name: tokens_of_step(r) for r in runs}
    if any(fn is None for fn, _ in found.values()):
        # Steps and tokens cannot share an axis: fall back to steps for every run.
        lacking = ", ".join(n for n, (fn, _) in found.items() if fn is None)
        return ({n: float for n in found}, f"optimizer step (no tokens_seen and no {CONFIG_FILE}: {lacking})",
                False)
    from_config = [n for n, (_, src) in found.items() if src == "config"]
    if not from_config:
        label = "tokens seen (tokens_seen in metrics.jsonl)"
    elif len(from_config) == len(runs):
        label = f"tokens seen (step × global batch × seq_len, {CONFIG_FILE})"
    else:
        label = f"tokens seen (metrics.jsonl; step × batch × seq_len for {', '.join(from_config)})"
    return {n: fn for n, (fn, _) in found.items()}, label, True


# ---- panels -------------------------------------------------------------------------------------
def _series(run: Run, metric: str, name: str, to_x: Callable[[int], float], scale: float = 1.0) -> Series:
    steps, x, y = [], [], []
    for r in run.records:
        v = r.get(metric)
        if isinstance(v, int | float) and not isinstance(v, bool):
            steps.append(int(r["step"]))
            x.append(float(to_x(int(r["step"]))))
            y.append(float(v) * scale)
    return Series(name=name, run=run.name, metric=metric, steps=steps, x=x, y=y)


def _panel(key: str, title: str, xlabel: str, ylabel: str, candidates: list[Series], runs: list[Run],
           empty: str) -> Panel:
    series = [s for s in candidates if s.x]
    have = {s.run for s in series}
    return Panel(key=key, title=title, xlabel=xlabel, ylabel=ylabel, series=series,
                 note=None if series else f"no data: {empty}",
                 missing=[r.name for r in runs if r.name not in have] if series else [])


def plot_data(runs: list[Run]) -> PlotData:
    """The panels to draw for ``runs``: titles, axis labels and the (x, y) series of each run."""
    to_x, xlabel, x_is_tokens = _x_axis(runs)
    panels = [
        _panel("loss", "train and validation loss", xlabel, LOSS_LABEL,
               [s for r in runs for s in (_series(r, "loss", f"{r.name} train", to_x[r.name]),
                                          _series(r, "val_loss", f"{r.name} val", to_x[r.name]))],
               runs, "no run logged loss or val_loss"),
        _panel("lr", "learning rate", xlabel, "learning rate",
               [_series(r, "lr", r.name, to_x[r.name]) for r in runs], runs, "no run logged lr"),
        _panel("tokens_per_s", "throughput", xlabel, "tokens/s (all devices)",
               [_series(r, "tokens_per_s", r.name, to_x[r.name]) for r in runs], runs,
               "no run logged tokens_per_s"),
        _panel("mfu", "MFU", xlabel, "model FLOPs utilization (%)",
               [_series(r, "mfu", r.name, to_x[r.name], scale=100.0) for r in runs], runs,
               "no run logged mfu (it needs the device's peak: a known GPU or trainer.peak_tflops)"),
    ]
    sources = sorted({k[len(SOURCE_PREFIX):] for r in runs for rec in r.records for k in rec
                      if k.startswith(SOURCE_PREFIX)})
    for src in sources:
        key = SOURCE_PREFIX + src
        panels.append(_panel(key, f"validation loss: {src}", xlabel, LOSS_LABEL,
                             [_series(r, key, r.name, to_x[r.name]) for r in runs], runs, f"no run logged {key}"))
    if not sources:
        # An explicit empty panel: a missing per-source panel would look like a plotting bug.
        panels.append(Panel(key=SOURCE_PREFIX + "*", title="per-source validation loss", xlabel=xlabel,
                            ylabel=LOSS_LABEL, series=[],
                            note=f"no per-source validation\n(no {SOURCE_PREFIX}<source> keys in {METRICS_FILE})"))
    notes = [n for r in runs for n in r.notes]
    return PlotData(title=" vs ".join(r.name for r in runs), runs=[r.name for r in runs], panels=panels,
                    x_is_tokens=x_is_tokens, notes=notes)


# ---- output -------------------------------------------------------------------------------------
def figure(data: PlotData) -> Figure:
    """A matplotlib Figure of ``data``: one axes per panel, in order; each run keeps one colour."""
    # The object API with the Agg canvas (as data_prep/retention_report.py): no pyplot global state, no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    n = len(data.panels)
    ncols = min(3 if n <= 6 else 4, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.4 * ncols, 3.4 * nrows + 0.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.remove()  # fig.axes then holds exactly the panels, in order
    colour = {name: f"C{i % 10}" for i, name in enumerate(data.runs)}
    for ax, panel in zip(axes, data.panels, strict=False):
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel, fontsize=8)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if data.x_is_tokens:
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.5M rather than an offset label
        if panel.key == "tokens_per_s":
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        if panel.note:
            # No empty 0..1 axes that could be read as data: ticks off, the reason in the middle.
            ax.set_xticks([])
            ax.set_yticks([])
            note = "\n".join(textwrap.fill(line, 36) for line in panel.note.splitlines())
            ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")
            continue
        for s in panel.series:
            val = s.metric.startswith("val_loss")
            ax.plot(s.x, s.y, color=colour[s.run], linestyle="--" if s.metric == "val_loss" else "-",
                    marker="o" if val or len(s.x) < 30 else None, markersize=3, linewidth=1.3, label=s.name)
        for name in panel.missing:  # a legend entry, so a run absent from a panel is not mistaken for hidden
            ax.plot([], [], color=colour[name], label=f"{name}: no data")
        ax.legend(fontsize=7)
    fig.suptitle(data.title, fontsize=11)
    fig.tight_layout()
    return fig


def draw(data: PlotData, path: Path | str) -> Figure:
    """Write :func:`figure` of ``data`` as a PNG at ``path`` (atomically); returns the Figure."""
    fig = figure(data)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return fig


def write_csv(data: PlotData, path: Path | str) -> None:
    """The drawn numbers in long format: run, panel, metric, step, x, y (x as in the PNG's x axis)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "panel", "metric", "step", "x", "y"])
    for panel in data.panels:
        for s in panel.series:
            for step, x, y in zip(s.steps, s.x, s.y, strict=True):
                w.writerow([s.run, panel.title, s.metric, step, repr(x), repr(y)])
    write_text(Path(path), buf.getvalue())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="slimpajama-plot", description="Compare training runs side by side: loss, "
                                "per-source validation loss, learning rate, tokens/s and MFU against tokens seen.")
    p.add_argument("run_dirs", nargs="+", type=Path, help="run_dirs holding metrics.jsonl (and config.json)")
    p.add_argument("--out", type=Path, default=Path("comparison.png"), help="the PNG (default: comparison.png)")
    p.add_argument("--csv", type=Path, default=None, help="the same numbers as CSV (default: --out with .csv)")
    p.add_argument("--names", default=None, help="comma-separated run names, one per run_dir (default: "
                   "config.json's logger.wandb.name, else the directory name)")
    a = p.parse_args(argv)
    try:
        runs = load_runs(a.run_dirs, a.names.split(",") if a.names else None)
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    data = plot_data(runs)
    for note in data.notes:
        print(f"note: {note}", file=sys.stderr)
    csv_path = a.csv or a.out.with_suffix(".csv")
    draw(data, a.out)
    write_csv(data, csv_path)
    rows = sum(len(s.x) for panel in data.panels for s in panel.series)
    print(f"wrote {a.out} ({len(data.panels)} panels, {len(runs)} runs) and {csv_path} ({rows} rows)")


if __name__ == "__main__":
    main()
