"""Data-prep scaling: peak RSS per task and CPU time of every stage at several corpus sizes, extrapolated.

    python benchmarks/bench_prep_scale.py [--sizes 50000,250000,1000000] [--tasks 2] [--workdir DIR] [--keep]
    python benchmarks/bench_prep_scale.py --quick          # 2000,6000,12000 documents (seconds; the test)

For each size a synthetic RedPajama-like corpus is written (jsonl.zst, seven sources in SlimPajama-like
proportions, short documents, ~35% of documents exact or near duplicates in clusters of 2..20, spread
over many files), then every task of every stage runs as its own process, one after the other, through
the CLI ``python -m data_prep.prep`` (what each SLURM array element of ``launch/slurm/prep.sbatch``
runs). Per task, ``os.wait4`` gives the child's peak RSS and CPU time (user + system, all threads); a bare
launcher process starts each task, so the child's peak RSS does not inherit this process's (see LAUNCHER).

Per stage it fits peak RSS = a + b * documents: parallel stages against the documents of the largest
part (their task only sees its part), single-task stages against the whole corpus. It extrapolates to
590 M documents in 64 tasks (SlimPajama) and compares with what ``prep.sbatch`` asks for: 8 GiB per
task for parallel stages, 64 GiB for a single-task stage. Throughput per core is megabytes of input
text per CPU-second of the stage (all its tasks), so it does not depend on how busy the machine is.

Units: RSS in MiB, extrapolations and limits in GiB, throughput in MB (1e6 bytes) of document text.
Prints a table and, last, one JSON object.

Only the CLI and ``data_prep.stages`` / ``data_prep.config`` (stage order, override names) are used,
read at run time, so the benchmark follows a restructure of ``data_prep``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard

REPO = Path(__file__).resolve().parents[1]

TARGET_DOCS = 590e6  # SlimPajama's RedPajama input, documents
TARGET_TASKS = 64
PARALLEL_LIMIT_GB = 8.0  # prep.sbatch: --mem-per-cpu=8G, one CPU per task
SINGLE_LIMIT_GB = 64.0  # what prep.sh may request for one single-task stage
THROUGHPUT_TOLERANCE = 0.2
DEFAULT_SIZES = (50_000, 250_000, 1_000_000)
QUICK_SIZES = (2_000, 6_000, 12_000)

# SlimPajama's document shares by source (RedPajama names), roughly: the corpus has these proportions.
SOURCES = {
    "RedPajamaCommonCrawl": 0.52,
    "RedPajamaC4": 0.27,
    "RedPajamaGithub": 0.05,
    "RedPajamaBook": 0.02,
    "RedPajamaArXiv": 0.04,
    "RedPajamaWikipedia": 0.06,
    "RedPajamaStackExchange": 0.04,
}
VOCAB_WORDS = 4000
WORDS_PER_DOC = (42, 58)  # with 4..8-letter words: 209..521 bytes, ~350 on average (min_doc_chars=200 keeps all)
DUP_FRACTION = 0.35  # documents that are a non-first member of a duplicate cluster
CLUSTER_SIZES = (2, 20)


# ---------------------------------------------------------------------------------------------- stages and CLI


def stage_list() -> list[tuple[str, bool]]:
    """(name, parallel) of every prep stage in run order, from ``data_prep.stages``.

    Two shapes are understood: ``STAGES`` a tuple of names with ``SINGLE_TASK`` a set of names, or a
    sequence of objects with ``.name`` and ``.parallel``.
    """
    from data_prep import stages

    out = []
    for s in stages.STAGES:
        if isinstance(s, str):
            out.append((s, s not in getattr(stages, "SINGLE_TASK", set())))
        else:
            out.append((str(s.name), bool(s.parallel)))
    return out


def _dataclass_default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def override_names() -> dict[str, str]:
    """Hydra override keys of the settings the benchmark sets: the run keys moved under ``run.`` and
    the holdout ratio under ``holdout.`` in the restructure; detected from ``data_prep.config``."""
    import data_prep.config as c

    run = "run." if hasattr(c, "RunConfig") else ""
    names = {k: run + k for k in ("stage", "task_index", "num_tasks", "workers")}
    holdout = {f.name: f for f in dataclasses.fields(c.PrepConfig)}.get("holdout")
    names["holdout_ratio"] = "holdout.ratio" if holdout and dataclasses.is_dataclass(_dataclass_default(holdout)) \
        else "holdout_ratio"
    return names


def tokenizer_overrides(code: Path) -> list[str]:
    """A 2000-piece vocabulary on at most 20 MB of sample, so tokenizer training stays quick; only the
    keys the default tokenizer preset (``conf/tokenizer/bpe_8k.yaml``) has."""
    preset = code / "conf/tokenizer/bpe_8k.yaml"
    text = preset.read_text() if preset.is_file() else ""
    keys = {line.split(":", 1)[0].strip() for line in text.splitlines() if ":" in line and not line.startswith("#")}
    wanted = {"vocab_size": 2000, "max_sample_bytes": 20_000_000}
    return [f"tokenizer.{k}={v}" for k, v in wanted.items() if k in keys or not keys]


# ---------------------------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """A generated corpus: where it is, its documents per input file (sorted path order), text bytes."""

    root: Path
    docs: int
    text_bytes: int
    file_docs: list[int]
    dup_docs: int
    clusters: int
    gen_s: float

    def largest_part(self, tasks: int) -> int:
        """Documents of the largest part: the clean stage gives task i the files i, i+n, ... (sorted)."""
        return max(sum(self.file_docs[i::tasks]) for i in range(tasks))


def _vocab(rng: np.random.Generator) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words: set[str] = set()
    while len(words) < VOCAB_WORDS:
        n = int(rng.integers(4, 9))
        words.add("".join(rng.choice(letters, n)))
    return sorted(words)


def build_corpus(root: Path, docs: int, seed: int = 0) -> Corpus:
    """Write ``docs`` documents as RedPajama-like jsonl.zst files under ``root/train``; deterministic.

    Documents are base documents (random words) or members of duplicate clusters: the first member is
    the base, each other one an exact copy or a near copy with its first and/or last word replaced
    (word 13-gram Jaccard >= 0.85 with the base, so the dedup stages find it). Members are scattered
    over all files, so clusters cross task boundaries as they do in RedPajama.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    vocab = _vocab(rng)
    # Cluster sizes ~ 1/s^2 on 2..20 (mean ~4.4): add clusters until their extra members reach DUP_FRACTION.
    sizes_all = np.arange(CLUSTER_SIZES[0], CLUSTER_SIZES[1] + 1)
    p = 1.0 / sizes_all.astype(float) ** 2
    want_dups = int(DUP_FRACTION * docs)
    draw = rng.choice(sizes_all, size=max(1, want_dups), p=p / p.sum())
    extra = np.cumsum(draw - 1)
    n_clusters = int(np.searchsorted(extra, want_dups)) + 1 if want_dups else 0
    csizes = draw[:n_clusters]
    if n_clusters and csizes.sum() > docs:  # only for absurdly small corpora
        n_clusters, csizes = 0, csizes[:0]
    singles = docs - int(csizes.sum())
    n_base = singles + n_clusters
    # One row per document: its base, and which edge words are replaced (0 none, 1 first, 2 last, 3 both).
    base = np.concatenate([np.arange(n_clusters).repeat(csizes), np.arange(n_clusters, n_base)]).astype(np.int64)
    first = np.ones(docs, bool)
    first[: int(csizes.sum())] = False
    first[np.cumsum(csizes) - csizes] = True  # each cluster's first member is its base
    # Half of the other members are exact copies, half near copies.
    mutate = np.where(first | (rng.random(docs) < 0.5), 0, rng.integers(1, 4, docs))
    order = rng.permutation(docs)
    base, mutate = base[order], mutate[order]
    n_words = rng.integers(WORDS_PER_DOC[0], WORDS_PER_DOC[1] + 1, n_base)
    words = rng.integers(0, VOCAB_WORDS, (n_base, WORDS_PER_DOC[1]), dtype=np.int32)
    repl = rng.integers(0, VOCAB_WORDS, (docs, 2), dtype=np.int32)
    names = np.array(list(SOURCES))
    shares = np.array(list(SOURCES.values()))
    source = rng.choice(len(names), n_base, p=shares / shares.sum())

    n_files = 64 * max(1, round(docs / 500_000))  # many files, so tasks get balanced parts
    bounds = np.linspace(0, docs, n_files + 1).astype(np.int64)
    out = root / "train" / "chunk1"
    out.mkdir(parents=True, exist_ok=True)
    cctx = zstandard.ZstdCompressor(level=3)
    text_bytes = 0
    for f in range(n_files):
        lines = []
        for d in range(bounds[f], bounds[f + 1]):
            b = base[d]
            w = [vocab[k] for k in words[b, : n_words[b]]]
            m = mutate[d]
            if m & 1:
                w[0] = vocab[repl[d, 0]]
            if m & 2:
                w[-1] = vocab[repl[d, 1]]
            text = " ".join(w)
            text_bytes += len(text)  # ASCII
            lines.append(json.dumps({"text": text, "meta": {"redpajama_set_name": str(names[source[b]])}}))
        (out / f"example_train_{f:05d}.jsonl.zst").write_bytes(cctx.compress(("\n".join(lines) + "\n").encode()))
    return Corpus(root, docs, text_bytes, [int(x) for x in np.diff(bounds)], int((csizes - 1).sum()), n_clusters,
                  time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- running tasks


@dataclass
class TaskRun:
    peak_rss: int  # bytes
    cpu_s: float
    wall_s: float


@dataclass
class StageRun:
    name: str
    parallel: bool
    tasks: list[TaskRun] = field(default_factory=list)

    @property
    def peak_rss(self) -> int:
        return max(t.peak_rss for t in self.tasks)

    @property
    def cpu_s(self) -> float:
        return sum(t.cpu_s for t in self.tasks)

    @property
    def wall_s(self) -> float:
        return sum(t.wall_s for t in self.tasks)


def child_env(code: Path) -> dict[str, str]:
    """The prep processes import ``data_prep`` from ``code`` and run compiled code single-threaded
    (parallelism comes from tasks, and per-core figures stay honest)."""
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(code)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


# Linux carries a process's RSS high-water mark across fork + exec into the child's ru_maxrss: a child of
# this process (hundreds of MB after building a corpus) would report at least that. So each task is
# started by a bare interpreter (~10 MB) that waits for it with wait4 and writes "exit maxrss_kib cpu_s".
LAUNCHER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, ru = os.wait4(p.pid, 0)\n"
    "p.returncode = os.waitstatus_to_exitcode(status)\n"
    "with open(sys.argv[1], 'w') as fh:\n"
    "    fh.write(f'{p.returncode} {ru.ru_maxrss} {ru.ru_utime + ru.ru_stime}')\n"
)


def run_measured(cmd: list[str], log: Path, cwd: Path, env: dict[str, str]) -> TaskRun:
    """Run ``cmd`` as a child of a bare launcher; its peak RSS and CPU time (user + system, all threads and
    reaped children) from ``os.wait4`` on its pid."""
    rusage = log.with_suffix(".rusage")
    w0 = time.perf_counter()
    with open(log, "wb") as fh:
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(rusage), *cmd], stdout=fh, stderr=subprocess.STDOUT,
                       cwd=cwd, env=env, check=False)
    wall = time.perf_counter() - w0
    code, maxrss_kib, cpu = rusage.read_text().split() if rusage.is_file() else ("launcher failed", "0", "0")
    if code != "0":
        tail = log.read_text(errors="replace")[-4000:]
        sys.stderr.write(f"FAILED (exit {code}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}\n")
        sys.exit(1)
    return TaskRun(int(maxrss_kib) * 1024, float(cpu), wall)  # ru_maxrss is KiB on Linux


def prep_command(corpus: Path, out: Path, tasks: int, keys: dict[str, str], tok: list[str]) -> list[str]:
    """The CLI call shared by every task (stage and task index are appended)."""
    return [sys.executable, "-m", "data_prep.prep", f"inputs=['{corpus / 'train'}']", f"input_root='{corpus}'",
            f"output_dir='{out}'", f"{keys['num_tasks']}={tasks}", f"{keys['workers']}=1",
            f"{keys['holdout_ratio']}=0.01", "seq_len=256", "samples_per_shard=512", *tok]


def run_size(corpus: Corpus, work: Path, tasks: int, stages: list[tuple[str, bool]], keys: dict[str, str],
             tok: list[str], env: dict[str, str]) -> list[StageRun]:
    """Every task of every stage, each its own process, one at a time."""
    out, logs = work / "out", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = prep_command(corpus.root, out, tasks, keys, tok)
    runs = []
    for name, parallel in stages:
        sr = StageRun(name, parallel)
        for i in range(tasks if parallel else 1):
            cmd = base + [f"{keys['stage']}={name}", f"{keys['task_index']}={i}"]
            sr.tasks.append(run_measured(cmd, logs / f"{name}-{i}.log", work, env))
        print(f"  {corpus.docs:>9d} docs  {name:10s} {len(sr.tasks)} task(s)  peak {sr.peak_rss / 2**20:7.0f} MiB  "
              f"cpu {sr.cpu_s:7.1f} s  wall {sr.wall_s:7.1f} s", file=sys.stderr, flush=True)
        runs.append(sr)
    return runs


def startup_cost(corpus: Corpus, work: Path, tasks: int, keys: dict[str, str], tok: list[str],
                 env: dict[str, str]) -> TaskRun:
    """Interpreter, imports and config composition alone (``--cfg job`` prints the config and exits):
    the floor of every task's memory and CPU time."""
    cmd = prep_command(corpus.root, work / "out-startup", tasks, keys, tok) + ["--cfg", "job"]
    return run_measured(cmd, work / "startup.log", work, env)


# ---------------------------------------------------------------------------------------------- analysis


def analyse(sizes: list[int], corpora: list[Corpus], runs: list[list[StageRun]], tasks: int,
            startup_cpu_s: float = 0.0) -> dict:
    """Fit memory per stage, extrapolate to SlimPajama, compare throughput across sizes.

    ``startup_cpu_s`` (interpreter, imports, config, per process) only feeds ``mb_s_per_core_net_of_startup``:
    a fixed cost that dominates small corpora but not SlimPajama-sized parts."""
    stages: dict[str, dict] = {}
    mb = [c.text_bytes / 1e6 for c in corpora]
    for k, (name, parallel) in enumerate((s.name, s.parallel) for s in runs[0]):
        rows = [r[k] for r in runs]
        x = np.array([c.largest_part(tasks) if parallel else c.docs for c in corpora], float)
        y = np.array([r.peak_rss for r in rows], float)
        b, a = np.polyfit(x, y, 1)
        at = TARGET_DOCS / TARGET_TASKS if parallel else TARGET_DOCS
        # A stage's memory does not shrink with more documents: a negative slope (noise) extrapolates
        # to the largest measured peak.
        extra = max(a + b * at, y.max()) / 2**30
        limit = PARALLEL_LIMIT_GB if parallel else SINGLE_LIMIT_GB
        rate = [m / max(r.cpu_s, 1e-9) for m, r in zip(mb, rows, strict=True)]
        net = [m / max(r.cpu_s - len(r.tasks) * startup_cpu_s, 1e-3) for m, r in zip(mb, rows, strict=True)]
        ratio = rate[-1] / rate[0]
        stages[name] = {
            "parallel": parallel,
            "tasks": len(rows[0].tasks),
            "docs_fitted": [int(v) for v in x],
            "peak_rss_mb": [round(v / 2**20, 1) for v in y],
            "bytes_per_doc": round(float(b), 2),
            "intercept_mb": round(float(a) / 2**20, 1),
            "extrapolated_gb_590m": round(float(extra), 2),
            "limit_gb": limit,
            "fits": bool(extra <= limit),
            "cpu_s": [round(r.cpu_s, 2) for r in rows],
            "wall_s": [round(r.wall_s, 2) for r in rows],
            "mb_s_per_core": [round(v, 3) for v in rate],
            "throughput_ratio_largest_vs_smallest": round(ratio, 3),
            "throughput_within_20pct": bool(abs(ratio - 1) <= THROUGHPUT_TOLERANCE),
            "mb_s_per_core_net_of_startup": [round(v, 3) for v in net],
            # The failure mode the target guards against is a superlinear step: throughput per core
            # falling as the corpus grows. A rise means fixed per-task costs being amortized.
            # Judged only where the stage's own work (net of startup) is at least 1 CPU-s at every
            # size: below that the net figure is mostly timer noise.
            "no_superlinear_slowdown": bool(net[-1] / net[0] >= 1 - THROUGHPUT_TOLERANCE
                                            or min(r.cpu_s - len(r.tasks) * startup_cpu_s for r in rows) < 1.0),
        }
    total = [m / sum(s.cpu_s for s in r) for m, r in zip(mb, runs, strict=True)]
    return {
        "sizes": sizes,
        "tasks": tasks,
        "stages": stages,
        "target_docs": TARGET_DOCS,
        "target_tasks": TARGET_TASKS,
        "input_mb": [round(m, 2) for m in mb],
        "total_mb_s_per_core": [round(v, 3) for v in total],
        "total_throughput_ratio_largest_vs_smallest": round(total[-1] / total[0], 3),
        "all_fit": all(s["fits"] for s in stages.values()),
        "all_throughput_within_20pct": all(s["throughput_within_20pct"] for s in stages.values()),
        "no_superlinear_slowdown": all(s["no_superlinear_slowdown"] for s in stages.values()),
    }


def print_table(res: dict, corpora: list[Corpus], startup: TaskRun) -> None:
    sizes = res["sizes"]
    desc = [f"{c.docs} docs / {c.text_bytes / 1e6:.1f} MB / {len(c.file_docs)} files / {c.dup_docs} dups in "
            f"{c.clusters} clusters" for c in corpora]
    print(f"corpora: {'; '.join(desc)}")
    print(f"tasks per parallel stage: {res['tasks']}; each task its own process, RAYON_NUM_THREADS=1; startup alone "
          f"(python -m data_prep.prep --cfg job): {startup.peak_rss / 2**20:.0f} MiB, {startup.cpu_s:.2f} CPU s")
    w = max(10, 9 * len(sizes) - 1)
    print(f"{'stage':10s} {'tasks':>5s}  {'peak RSS MiB @ ' + '/'.join(f'{s // 1000}k' for s in sizes):>{w}s}  "
          f"{'B/doc':>8s} {'GiB@590M':>9s} {'limit':>6s} {'fits':>5s}  {'MB/s/core':>{w}s} {'ratio':>8s} {'net':>6s}")
    for name, s in res["stages"].items():
        rss = " ".join(f"{v:8.0f}" for v in s["peak_rss_mb"])
        rate = " ".join(f"{v:8.2f}" for v in s["mb_s_per_core"])
        ratio = f"{s['throughput_ratio_largest_vs_smallest']:6.2f}" + ("" if s["throughput_within_20pct"] else " !")
        net = s["mb_s_per_core_net_of_startup"]
        print(f"{name:10s} {s['tasks']:5d}  {rss:>{w}s}  {s['bytes_per_doc']:8.1f} {s['extrapolated_gb_590m']:9.2f} "
              f"{s['limit_gb']:6.0f} {'yes' if s['fits'] else 'NO':>5s}  {rate:>{w}s} {ratio:8s} "
              f"{net[-1] / net[0]:6.2f}" + ("" if s["no_superlinear_slowdown"] else " SLOWER"))
    rate = " ".join(f"{v:8.2f}" for v in res["total_mb_s_per_core"])
    print(f"{'total':10s} {'':5s}  {'':>{w}s}  {'':8s} {'':9s} {'':6s} {'':>5s}  {rate:>{w}s} "
          f"{res['total_throughput_ratio_largest_vs_smallest']:6.2f}")
    print("B/doc: fitted peak RSS per document of the task's part (parallel) or of the corpus (single-task); "
          f"GiB@590M: at {TARGET_DOCS / 1e6:.0f} M documents in {TARGET_TASKS} tasks; ratio: MB/s/core largest / "
          f"smallest size (! = off by more than {THROUGHPUT_TOLERANCE:.0%}); net: the same ratio without each task's "
          f"startup CPU (SLOWER = the largest size is over {THROUGHPUT_TOLERANCE:.0%} slower per core: a superlinear "
          "step)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="comma-separated document counts (default 50000,250000,1000000)")
    p.add_argument("--quick", action="store_true", help=f"sizes {','.join(map(str, QUICK_SIZES))} (a smoke run)")
    p.add_argument("--tasks", type=int, default=2, help="num_tasks of the prep run")
    p.add_argument("--workdir", default=None, help="where corpora and outputs go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep corpora and outputs")
    p.add_argument("--code", default=str(REPO), help="checkout whose data_prep runs (default: this repository)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", action="append", default=[],
                   help="extra prep override for every task, e.g. --override run.bucket_memory_mb=64 (repeatable)")
    args = p.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(",")) if args.sizes else list(QUICK_SIZES if args.quick
                                                                                   else DEFAULT_SIZES)
    if len(sizes) < 2 or args.tasks < 1:
        p.error("need at least two sizes and --tasks >= 1")
    code = Path(args.code).resolve()
    sys.path.insert(0, str(code))  # stage_list / override_names read the same code the children run
    stages, keys, tok = stage_list(), override_names(), tokenizer_overrides(code) + list(args.override)
    env = child_env(code)

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench_prep_scale_", dir=args.workdir))
    t0 = time.perf_counter()
    corpora, runs = [], []
    startup = None
    for n in sizes:
        work = root / f"n{n}"
        corpus = build_corpus(work / "corpus", n, seed=args.seed + n)
        print(f"{n} docs: corpus {corpus.text_bytes / 1e6:.1f} MB in {len(corpus.file_docs)} files, "
              f"{corpus.dup_docs} duplicates, built in {corpus.gen_s:.1f} s", file=sys.stderr, flush=True)
        if startup is None:
            startup = startup_cost(corpus, work, args.tasks, keys, tok, env)
        runs.append(run_size(corpus, work, args.tasks, stages, keys, tok, env))
        corpora.append(corpus)
        if not args.keep:  # the largest size needs the disk more than the smaller ones' leftovers
            shutil.rmtree(work)
    res = analyse(sizes, corpora, runs, args.tasks, startup.cpu_s)
    res["startup_rss_mb"] = round(startup.peak_rss / 2**20, 1)
    res["startup_cpu_s"] = round(startup.cpu_s, 3)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.keep:
        print(f"kept {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    print_table(res, corpora, startup)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
