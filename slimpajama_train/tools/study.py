"""``slimpajama-study``: a data-mixture study in one command, as SlimPajama-DC ran it.

Given a corpus and a list of mixtures, it

1. prepares the corpus once up to tokenization (clean, dedup, split, tokenizer, tokenize) with a
   tokenizer whose sample ignores the mixture, so every mixture shares it;
2. per mixture, plans and writes that mixture's shards in ``<out>/data/<name>`` from hard links to
   the shared work (only ``plan``, ``shards`` and ``report`` run), so the validation split, the
   tokenizer and the token ids are the same for every mixture;
3. trains the same model with the same token budget on each (``<out>/runs/<name>``);
4. evaluates each: per-source validation loss from the run's final evaluation, and downstream tasks
   through ``slimpajama-eval`` when ``--tasks`` is given;
5. writes ``<out>/study.md`` and ``study.json`` (a row per mixture: per-source validation loss, their
   average, overall validation loss, downstream scores) and ``<out>/study.png`` + ``.csv``
   (``slimpajama-plot`` of all runs).

Locally the steps run in this process and in ``torchrun`` subprocesses. ``--slurm`` submits one
prep job, one ``launch/slurm/train.sbatch`` job per mixture depending on it, and one table job
depending on all of them (``SBATCH`` names the sbatch command, ``SBATCH_EXTRA`` adds options).

    slimpajama-study --out studies/demo --mixtures none,code=RedPajamaGithub:0.6+RedPajamaBook:0.4 \\
        --prep 'inputs=[train]' --prep input_root=data/demo_corpus \\
        --train model=tiny --train trainer.max_steps=60
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.cli import add_debug_flag, cli_errors

REPO = Path(__file__).resolve().parents[2]
# Work files of the stages that depend on the mixture; everything else is shared by hard links.
_MIXTURE_DEPENDENT = ("plan", "shard_entries", "markers/plan", "markers/shards", "markers/report")


@dataclass
class Mixture:
    """A named mixture: a ``prep_mixture`` preset, or inline target proportions."""

    name: str
    preset: str | None = None
    proportions: dict[str, float] = field(default_factory=dict)

    def prep_overrides(self) -> list[str]:
        if self.preset is not None:
            return [f"prep_mixture={self.preset}"]
        return ["prep_mixture=none", f"mixture.preset={self.name}",
                *(f"mixture.proportions.{k}={v}" for k, v in self.proportions.items())]


def parse_mixtures(spec: str) -> list[Mixture]:
    """``none,dc3,code=RedPajamaGithub:0.6+RedPajamaBook:0.4``: preset names, or ``name=source:fraction+...``."""
    out: list[Mixture] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" not in item:
            if not (REPO / "conf/prep_mixture" / f"{item}.yaml").is_file():
                known = sorted(p.stem for p in (REPO / "conf/prep_mixture").glob("*.yaml"))
                raise ValueError(f"--mixtures: {item!r} is not a prep_mixture preset ({', '.join(known)}) "
                                 "nor name=source:fraction+...")
            out.append(Mixture(item, preset=item))
            continue
        name, body = item.split("=", 1)
        props: dict[str, float] = {}
        for part in body.split("+"):
            src, _, frac = part.partition(":")
            try:
                props[src.strip()] = float(frac)
            except ValueError:
                raise ValueError(f"--mixtures: {part!r} in {item!r}: expected source:fraction") from None
        out.append(Mixture(name.strip(), proportions=props))
    names = [m.name for m in out]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"--mixtures: give at least one mixture, with distinct names (got {names})")
    return out


def compose_prep(overrides: list[str]) -> Any:
    """The PrepConfig that ``slimpajama-prep`` would build from these Hydra overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from data_prep.cli import conf_dir
    from data_prep.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="prep", overrides=overrides))


def link_shared_work(base: Path, target: Path) -> int:
    """Hard-link (or copy, across file systems) the mixture-independent outputs of ``base`` into
    ``target``. Stages replace files by renaming, never write in place, so the links stay intact."""
    n = 0
    for src in sorted((base / "work").rglob("*")):
        rel = src.relative_to(base / "work")
        if src.is_dir() or any(rel.as_posix().startswith(p + "/") or rel.as_posix() == p for p in _MIXTURE_DEPENDENT):
            continue
        n += _link(src, target / "work" / rel)
    for name in ("tokenizer.model", "removed.jsonl"):  # written next to the shards by earlier stages
        if (base / name).is_file():
            n += _link(base / name, target / name)
    return n


def _link(src: Path, dst: Path) -> int:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return 1


def prepare(out: Path, mixtures: list[Mixture], prep_overrides: list[str]) -> dict[str, Path]:
    """The shared prep, then each mixture's shards; returns mixture name -> shard directory."""
    from data_prep.layout import WorkDir
    from data_prep.mixture import check_sources
    from data_prep.prep import run_prep

    shared = ["tokenizer.sample_by_mixture=false", *prep_overrides]
    base = out / "data" / "_shared"
    base_cfg = compose_prep([*shared, "prep_mixture=none", f"output_dir={base}"])
    run_prep(base_cfg)
    cfgs = {m.name: compose_prep([*shared, *m.prep_overrides(), f"output_dir={out / 'data' / m.name}"])
            for m in mixtures}
    known = WorkDir(base / "work").sources(base_cfg.run.num_tasks)
    for m in mixtures:  # every name, before any mixture's shards are written
        check_sources(cfgs[m.name].mixture, known, where=f"--mixtures {m.name}: mixture")
    dirs = {}
    for m in mixtures:
        target = out / "data" / m.name
        link_shared_work(base, target)
        manifest = run_prep(cfgs[m.name])
        props = manifest["splits"]["train"]["proportions"]
        print(f"study: mixture {m.name}: {manifest['splits']['train']['tokens']:,} train tokens, proportions {props}",
              file=sys.stderr)
        dirs[m.name] = target
    return dirs


def train_command(shards: Path, run_dir: Path, name: str, train_overrides: list[str], nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "slimpajama_train.train", f"data.path={shards}", f"run_dir={run_dir}",
            f"logger.wandb.name={name}", *train_overrides]


def final_eval(run_dir: Path) -> dict[str, Any]:
    """The run's last evaluation record (overall and per-source validation loss)."""
    last: dict[str, Any] | None = None
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run has no metrics (did it train?)")
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val_loss" in rec:
            last = rec
    if last is None:
        raise ValueError(f"{path}: no evaluation recorded (set trainer.eval_interval)")
    return last


def downstream(run_dir: Path, tasks: str, include_path: str | None, limit: int | None) -> dict[str, float]:
    """Scores of ``tasks`` on the run's latest checkpoint through ``slimpajama-eval``."""
    out = run_dir / "downstream.json"
    cmd = [sys.executable, "-m", "slimpajama_train.tools.evaluate", str(run_dir), "--tasks", tasks,
           "--output", str(out)]
    if include_path:
        cmd += ["--include-path", include_path]
    if limit:
        cmd += ["--limit", str(limit)]
    subprocess.run(cmd, check=True)
    return flat_scores(json.loads(out.read_text()))


def flat_scores(results: dict[str, Any]) -> dict[str, float]:
    """``task/metric`` -> value of the numeric metrics in a slimpajama-eval result file."""
    scores: dict[str, float] = {}
    for task, metrics in (results.get("tasks") or {}).items():
        for metric, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and "stderr" not in metric:
                scores[f"{task}/{metric}"] = float(value)
    return scores


def table(out: Path, mixtures: list[Mixture], scores: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """study.json and study.md: per mixture, per-source validation loss, average, overall, downstream."""
    rows = []
    for m in mixtures:
        ev = final_eval(out / "runs" / m.name)
        per_source = {k.split("/", 1)[1]: v for k, v in ev.items() if k.startswith("val_loss/")}
        manifest = json.loads((out / "data" / m.name / "manifest.json").read_text())
        rows.append({
            "mixture": m.name,
            "train_proportions": manifest["splits"]["train"]["proportions"],
            "step": ev["step"],
            "val_loss": ev["val_loss"],
            "val_loss_by_source": dict(sorted(per_source.items())),
            "val_loss_source_average": sum(per_source.values()) / len(per_source) if per_source else None,
            "downstream": (scores or {}).get(m.name, {}),
        })
    result = {"mixtures": rows, "sources": sorted({s for r in rows for s in r["val_loss_by_source"]})}
    from data_prep.atomic import write_json, write_text

    write_json(out / "study.json", result)
    write_text(out / "study.md", markdown(result))
    plot(out, [m.name for m in mixtures])
    return result


def markdown(result: dict[str, Any]) -> str:
    """The study table; the best (lowest loss, highest score) value of each column in bold."""
    rows, sources = result["mixtures"], result["sources"]
    tasks = sorted({t for r in rows for t in r["downstream"]})
    cols = [*(f"val {s}" for s in sources), "val source avg", "val overall", *tasks]

    def cell(r: dict[str, Any], c: str) -> float | None:
        if c == "val source avg":
            return r["val_loss_source_average"]
        if c == "val overall":
            return r["val_loss"]
        if c.startswith("val "):
            return r["val_loss_by_source"].get(c[4:])
        return r["downstream"].get(c)

    best = {}
    for c in cols:
        vals = [v for r in rows if (v := cell(r, c)) is not None]
        if vals:
            best[c] = max(vals) if c in tasks else min(vals)
    lines = ["# Data-mixture study", "", "Validation loss per source (lower is better) after the same token budget; "
             "downstream scores (higher is better). Best of each column in bold.", "",
             "| mixture | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = cell(r, c)
            cells.append("" if v is None else (f"**{v:.4f}**" if v == best.get(c) else f"{v:.4f}"))
        lines.append(f"| {r['mixture']} | " + " | ".join(cells) + " |")
    lines += ["", "Realized train proportions:", ""]
    lines += [f"- {r['mixture']}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["train_proportions"].items())
              for r in rows]
    return "\n".join(lines) + "\n"


def plot(out: Path, names: list[str]) -> None:
    from slimpajama_train.tools.plot import draw, load_runs, plot_data, write_csv

    data = plot_data(load_runs([out / "runs" / n for n in names], names))
    draw(data, out / "study.png")
    write_csv(data, out / "study.csv")


def submit_slurm(out: Path, mixtures: list[Mixture], argv: list[str], train_overrides: list[str]) -> dict[str, str]:
    """One prep job, a train job per mixture after it, a table job after all; returns the job ids."""
    sbatch = shlex.split(os.environ.get("SBATCH", "sbatch")) + shlex.split(os.environ.get("SBATCH_EXTRA", ""))
    me = [sys.executable, "-m", "slimpajama_train.tools.study", *argv]

    def submit(args: list[str]) -> str:
        res = subprocess.run([*sbatch, "--parsable", *args], check=True, capture_output=True, text=True)
        return res.stdout.strip().split(";")[0]

    (out / "logs").mkdir(parents=True, exist_ok=True)
    jobs = {"prep": submit(["--job-name=study-prep", f"--output={out}/logs/%x-%j.out",
                            f"--wrap={shlex.join([*me, '--phase', 'prep'])}"])}
    for m in mixtures:
        jobs[m.name] = submit([f"--job-name=study-{m.name}", f"--dependency=afterok:{jobs['prep']}",
                               f"--output={out}/logs/%x-%j.out", str(REPO / "launch/slurm/train.sbatch"),
                               f"data.path={out / 'data' / m.name}", f"run_dir={out / 'runs' / m.name}",
                               f"logger.wandb.name={m.name}", *train_overrides])
    after = ":".join(jobs[m.name] for m in mixtures)
    jobs["table"] = submit(["--job-name=study-table", f"--dependency=afterok:{after}",
                            f"--output={out}/logs/%x-%j.out", f"--wrap={shlex.join([*me, '--phase', 'table'])}"])
    return jobs


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="study directory (data/, runs/, study.md, study.json, study.png)")
    p.add_argument("--mixtures", required=True, help="comma-separated presets or name=source:fraction+...")
    p.add_argument("--prep", action="append", default=[], help="slimpajama-prep override (repeatable)")
    p.add_argument("--train", action="append", default=[], help="slimpajama-train override (repeatable)")
    p.add_argument("--nproc", type=int, default=1, help="processes per local training run (torchrun)")
    p.add_argument("--tasks", default=None, help="lm-eval tasks for slimpajama-eval (comma-separated)")
    p.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=int, default=None, help="examples per downstream task")
    p.add_argument("--phase", choices=("all", "prep", "train", "table"), default="all")
    p.add_argument("--slurm", action="store_true", help="submit prep, train and table jobs with dependencies")
    add_debug_flag(p)
    a = p.parse_args(argv)
    with cli_errors("slimpajama-study", a.debug):
        _run(a, argv)


def _run(a: argparse.Namespace, argv: list[str]) -> None:
    out = Path(a.out).resolve()
    mixtures = parse_mixtures(a.mixtures)
    if a.slurm:
        passthrough = [x for x in argv if x not in ("--slurm", "--debug")]
        for name, job in submit_slurm(out, mixtures, passthrough, a.train).items():
            print(f"{name}: job {job}")
        return
    if a.phase in ("all", "prep"):
        prepare(out, mixtures, a.prep)
    if a.phase in ("all", "train"):
        for m in mixtures:
            subprocess.run(train_command(out / "data" / m.name, out / "runs" / m.name, m.name, a.train, a.nproc),
                           check=True)
    if a.phase in ("all", "table"):
        scores = {m.name: downstream(out / "runs" / m.name, a.tasks, a.include_path, a.limit)
                  for m in mixtures} if a.tasks else None
        result = table(out, mixtures, scores)
        print((out / "study.md").read_text())
        print(json.dumps({"study": str(out / "study.json"), "mixtures": [r["mixture"] for r in result["mixtures"]]}))


if __name__ == "__main__":
    main()
