"""One command for a GPU host (``make gpu-check``): the GPU tests and benchmarks on whatever GPUs it has,
summed up in ONE JSON line (the last line of stdout).

    python benchmarks/gpu_check.py [--models 125m 350m 1.3b 7b] [--steps 50] [--skip-tests] [--skip-mfu]
        [--skip-nccl] [--skip-train] [--out FILE] [--timeout-s S] [--budget-s 480]

Parts, each a subprocess with a timeout (its process group is killed when it runs over), in this order:

- ``nccl``: ``benchmarks/bench_nccl.py`` over all local GPUs: all-reduce bus bandwidth (nccl-tests'
  busbw = algbw * 2(n-1)/n; on one GPU the all-reduce time, busbw null with the reason);
- ``tests``: ``pytest -m gpu tests/gpu`` (bf16 FSDP2 1 vs N GPUs, NCCL collectives, async checkpoint,
  preemption, no host syncs on non-log steps, the SDPA kernel): counts, the failures' names and
  messages, and the figures the tests recorded (loss differences, kernels);
- ``bench_train``: ``benchmarks/bench_train.py`` on the GPU (bf16, synthetic shards): trainer vs a bare loop;
- ``mfu``: ``benchmarks/bench_mfu.py`` (FSDP2 ``always_shard``, median step time, MFU under PaLM's and
  Megatron's conventions) for ``--models`` at micro-batch ``MFU_MICRO_BATCH`` x seq ``MFU_SEQ_LEN``, the
  shape of the README's MFU table; rows finished before a timeout are kept.

The JSON line: ``{"gpu_check": 1, "device", "gpus", "torch", "cuda", "tests", "nccl", "mfu",
"bench_train", "skipped": {part: reason}, "ok", "wall_s"}``. A human summary precedes it; each part's
full output goes to ``<log dir>/<part>.log`` (next to ``--out``, else in the work directory). Without
a CUDA GPU every part is skipped with the reason "no CUDA GPU" and the exit status is 0; otherwise
it is 1 when a part failed, timed out or a test failed. ``--cpu`` runs every part on the CPU with
tiny settings: a check of this script's plumbing (tests/benchmarks/test_gpu_check.py), not of a GPU.

The GPU host needs no Hydra, DeepSpeed, W&B or data_prep dependencies: only torch, numpy, pyyaml,
tqdm and pytest (``benchmarks/gpu_wheels.sh`` fetches pytest's wheels for an offline host).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("nccl", "tests", "bench_train", "mfu")
DEFAULT_TIMEOUT_S = {"nccl": 120, "tests": 330, "bench_train": 210, "mfu": 300}
NO_GPU = "no CUDA GPU"
MIN_PART_S = 30  # a part is not started with less of the budget left than this
# The shape the README's MFU table reports ("micro-batch 8 × seq 2048"); bench_mfu's own default
# micro-batch (4) would give other figures. tests/benchmarks/test_gpu_check.py reads the README.
MFU_MICRO_BATCH, MFU_SEQ_LEN = 8, 2048

DEVICE_INFO = (
    "import json, torch\n"
    "c = torch.cuda.is_available()\n"
    "print(json.dumps({'cuda_available': c, 'gpus': torch.cuda.device_count() if c else 0,\n"
    "                  'device': torch.cuda.get_device_name(0) if c else 'cpu', 'torch': torch.__version__,\n"
    "                  'cuda': torch.version.cuda}))\n"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["125m", "350m", "1.3b", "7b"], help="bench_mfu models")
    p.add_argument("--steps", type=int, default=50, help="bench_mfu measured steps (median reported)")
    p.add_argument("--warmup", type=int, default=10, help="bench_mfu warm-up steps")
    p.add_argument("--compile", action="store_true", help="bench_mfu with --compile (trainer.compile)")
    p.add_argument("--mfu-nproc", type=int, default=1, help="GPUs bench_mfu runs on (torchrun when > 1)")
    p.add_argument("--nproc", type=int, default=None, help="GPUs for the tests and NCCL (default: all)")
    for part in ("tests", "mfu", "nccl", "train"):
        p.add_argument(f"--skip-{part}", action="store_true", help=f"do not run the {part} part")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--log-dir", default=None, help="each part's output (default: beside --out, else the work dir)")
    p.add_argument("--work-dir", default=None, help="scratch space (default: a new temporary directory)")
    p.add_argument("--timeout-s", type=float, default=None,
                   help=f"per part (default: {', '.join(f'{k} {v}' for k, v in DEFAULT_TIMEOUT_S.items())})")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="all parts together: a part gets at most what is left; none starts with under "
                        f"{MIN_PART_S} s left")
    p.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[],
                   help="passed on to pytest (last on the command line), e.g. --pytest-args -k sdpa")
    p.add_argument("--cpu", action="store_true", help="run every part on the CPU with tiny settings (plumbing check)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.mfu_nproc < 1 or (a.nproc is not None and a.nproc < 1):
        p.error("--steps, --mfu-nproc and --nproc must be >= 1, --warmup >= 0")
    if a.timeout_s is not None and a.timeout_s <= 0 or a.budget_s <= 0:
        p.error("--timeout-s and --budget-s must be > 0")
    return a


def skip_flags(a: argparse.Namespace) -> dict[str, str]:
    flags = {"tests": a.skip_tests, "mfu": a.skip_mfu, "nccl": a.skip_nccl, "bench_train": a.skip_train}
    option = {"tests": "--skip-tests", "mfu": "--skip-mfu", "nccl": "--skip-nccl", "bench_train": "--skip-train"}
    return {part: option[part] for part, on in flags.items() if on}


def child_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


def device_info(python: str = sys.executable) -> dict:
    """This host's torch, CUDA and GPUs, asked in a subprocess (this process never touches CUDA)."""
    try:
        proc = subprocess.run([python, "-c", DEVICE_INFO], capture_output=True, text=True, timeout=120,
                              env=child_env())
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        error = proc.stderr.strip()[-500:]
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
        error = str(e)
    return {"cuda_available": False, "gpus": 0, "device": None, "torch": None, "cuda": None,
            "error": f"torch could not be queried: {error}"}


@dataclass
class PartRun:
    rc: int | None
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool


def run_part(cmd: list[str], timeout: float, log: Path | None, env: dict[str, str]) -> PartRun:
    """Run ``cmd`` in a session of its own; past ``timeout`` its whole process group (torchrun and its
    ranks included) gets SIGTERM, then SIGKILL. Output goes to ``log`` as well."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, err = proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            out, err = "", ""
    run = PartRun(proc.returncode, out or "", err or "", round(time.monotonic() - t0, 1), timed_out)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(cmd)}\n# rc {run.rc}, {run.wall_s} s{', TIMED OUT' if timed_out else ''}\n"
                       f"## stdout\n{run.stdout}\n## stderr\n{run.stderr}\n")
    return run


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def last_json(text: str) -> dict | None:
    found = json_lines(text)
    return found[-1] if found else None


def run_status(run: PartRun) -> dict:
    status = {"rc": run.rc, "wall_s": run.wall_s}
    if run.timed_out:
        status["timed_out"] = True
    if run.rc != 0:
        status["error"] = (run.stderr.strip() or run.stdout.strip())[-1500:]
    return status


def parse_junit(path: Path) -> dict:
    """Counts, failing test ids with their messages, and skip reasons from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: list[str] = []
    messages: dict[str, str] = {}
    skip_reasons: dict[str, int] = {}
    durations: dict[str, float] = {}
    for case in cases:
        module = case.get("classname", "")
        test_id = f"{module.replace('.', '/')}.py::{case.get('name')}" if module else case.get("name", "?")
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if skipped is None:
            durations[test_id] = round(float(case.get("time") or 0.0), 1)
        if failure is not None or error is not None:
            node = failure if failure is not None else error
            counts["failed" if failure is not None else "errors"] += 1
            failures.append(test_id)
            # The message's start (the assertion; for a failed run, its command and status) and the
            # report's end (where the subprocess's own traceback ends up).
            messages[test_id] = f"{(node.get('message') or '')[:400]}\n...\n{(node.text or '')[-900:]}".strip()
        elif skipped is not None:
            counts["skipped"] += 1
            reason = skipped.get("message") or ""
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "total": sum(counts.values()), "failures": failures, "failure_messages": messages,
            "skip_reasons": skip_reasons, "durations_s": durations}


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return json_lines(path.read_text())


def part_command(part: str, a: argparse.Namespace, gpus: int, work: Path) -> tuple[list[str], dict[str, str]]:
    py = sys.executable
    env = child_env()
    if part == "nccl":
        cmd = [py, str(REPO / "benchmarks/bench_nccl.py")]
        cmd += (["--device", "cpu", "--nproc", "2", "--sizes-mb", "1", "4", "--iters", "3", "--warmup", "1"] if a.cpu
                else ["--nproc", str(a.nproc or gpus)])
    elif part == "tests":
        cmd = [py, "-m", "pytest", "-m", "gpu", "tests/gpu", "--confcutdir", "tests/gpu", "-p", "no:cacheprovider",
               "-q", "-rfE", "--tb=short", "--junitxml", str(work / "junit.xml"), *a.pytest_args]
        # Only the plugins named here: a host's stray pytest plugins (entry points of unrelated
        # packages) cannot break or slow the run; pytest-timeout when installed (pyproject's timeout).
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd[3:3] = ["-p", "pytest_timeout"]
        env["GPU_CHECK_RECORD"] = str(work / "records.jsonl")
        if a.nproc:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(a.nproc))
    elif part == "bench_train":
        cmd = [py, str(REPO / "benchmarks/bench_train.py"), "--synthetic", "--data", str(work / "bench_train_data"),
               "--run-dir", str(work / "bench_train_run")]
        cmd += (["--device", "cpu", "--seq-len", "64", "--vocab", "2000", "--dim", "64", "--layers", "2",
                 "--micro-batch", "2", "--steps", "4", "--warmup", "1", "--repeats", "2"] if a.cpu
                else ["--device", "cuda", "--seq-len", "1024", "--dim", "768", "--layers", "12", "--micro-batch", "8",
                      "--steps", "40", "--warmup", "10", "--repeats", "3"])
    elif part == "mfu":
        cmd = [py, str(REPO / "benchmarks/bench_mfu.py")]
        if a.cpu:
            cmd += ["--device", "cpu", "--models", "tiny", "--seq-len", "64", "--micro-batch", "2", "--steps", "3",
                    "--warmup", "1", "--precision", "fp32", "--peak-tflops", "1"]
        else:
            cmd += ["--models", *a.models, "--micro-batch", str(MFU_MICRO_BATCH), "--seq-len", str(MFU_SEQ_LEN),
                    "--steps", str(a.steps), "--warmup", str(a.warmup), "--nproc", str(a.mfu_nproc),
                    "--compile" if a.compile else "--no-compile"]
    else:
        raise ValueError(f"unknown part {part!r}")
    return cmd, env


def summarize(part: str, run: PartRun, work: Path) -> dict:
    status = run_status(run)
    if part == "tests":
        junit = work / "junit.xml"
        result = parse_junit(junit) if junit.is_file() else {"error": "pytest wrote no JUnit report"}
        result["records"] = read_records(work / "records.jsonl")
        # pytest's 1 (tests failed) is in the counts and 5 (none collected) in the total; other codes
        # (an interrupted or broken run) and a timeout are errors of the part.
        if run.rc not in (0, 1, 5) or run.timed_out:
            result["error"] = (run.stderr.strip() or run.stdout.strip())[-1500:] or result.get("error")
        return {**result, "rc": run.rc, "wall_s": run.wall_s, **({"timed_out": True} if run.timed_out else {})}
    if part == "mfu":
        found = json_lines(run.stdout)
        final = next((j for j in reversed(found) if "rows" in j), None)
        if final is not None:
            return {**final, **status}
        rows = [j["row"] for j in found if "row" in j]  # the models finished before a failure or timeout
        return {"rows": rows, "complete": False, **status}
    out = last_json(run.stdout) or {}
    return {**out, **status}


def part_failed(part: str, summary: dict) -> bool:
    if summary.get("timed_out") or summary.get("error"):
        return True
    if part == "tests":
        return bool(summary.get("failed") or summary.get("errors"))
    return summary.get("rc") not in (0, None)


def fmt_part(part: str, s: dict) -> str:
    """One line per part for the human summary."""
    tail = f" ({s.get('wall_s', '?')} s{', TIMED OUT' if s.get('timed_out') else ''})"
    if part == "tests":
        line = (f"{s.get('passed', 0)} passed, {s.get('failed', 0)} failed, {s.get('errors', 0)} errors, "
                f"{s.get('skipped', 0)} skipped{tail}")
        for name in s.get("failures", []):
            line += f"\n      FAILED {name}: {s['failure_messages'].get(name, '').splitlines()[0:1]}"
        for rec in s.get("records", []):
            figures = {k: v for k, v in rec.items() if k != "test"}
            line += f"\n      {rec.get('test', '?').split('::')[-1]}: {json.dumps(figures, default=str)[:200]}"
    elif part == "nccl":
        if s.get("busbw_gbs_max") is not None:
            line = (f"all_reduce busbw max {s['busbw_gbs_max']:.1f} GB/s at {s['busbw_size_bytes'] / 2**20:g} MiB "
                    f"over {s.get('ranks')} ranks{tail}")
        elif s.get("rows"):
            line = f"{s.get('busbw_skipped', 'no busbw')}; " + ", ".join(
                f"{r['size_bytes'] / 2**20:g} MiB {r['time_us']:.0f} us" for r in s["rows"]) + tail
        else:
            line = f"no figures{tail}"
    elif part == "mfu":
        cells = []
        for r in s.get("rows", []):
            if "skipped" in r:
                cells.append(f"{r['model']} skipped ({r['skipped'][:60]})")
            elif r.get("mfu_palm") is not None:
                cells.append(f"{r['model']} MFU {100 * r['mfu_palm']:.1f}% PaLM / {100 * r['mfu_megatron']:.1f}% "
                             f"Megatron, {r['tokens_s_per_gpu']:,.0f} tok/s/GPU, {r['peak_mem_gb']:.1f} GB")
            else:
                cells.append(f"{r['model']} {r['tokens_s_per_gpu']:,.0f} tok/s/GPU (no peak FLOP/s known)")
        line = ("; ".join(cells) or "no rows") + tail
    else:
        pairs = f", median of {s['repeats']} pairs, spread {s['ratio_min']:.3f}-{s['ratio_max']:.3f}" \
            if "ratio_min" in s else ""
        line = (f"trainer / bare loop = {s['ratio']:.3f} ({s['trainer_tokens_s']:,.0f} vs "
                f"{s['bare_loop_tokens_s']:,.0f} tokens/s{pairs}){tail}" if "ratio" in s else f"no figures{tail}")
    if s.get("error"):
        line += f"\n      error: {s['error'][-300:]}"
    return line


def human_summary(result: dict) -> str:
    gpus = result["gpus"]
    head = (f"gpu_check: {gpus} x {result['device']}" if gpus else f"gpu_check: {result['device'] or 'no GPU'}")
    mode = " [--cpu: plumbing check, not a GPU check]" if result.get("cpu") else ""
    lines = [f"{head} (torch {result['torch']}, CUDA {result['cuda']}){mode}"]
    for part in PARTS:
        if part in result["skipped"]:
            lines.append(f"  {part}: skipped: {result['skipped'][part]}")
        else:
            lines.append(f"  {part}: {fmt_part(part, result[part])}")
    lines.append(f"  ok: {result['ok']}, {result['wall_s']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None, info: dict | None = None) -> int:
    a = parse_args(argv)
    t0 = time.monotonic()
    info = info if info is not None else device_info()
    gpus = int(info.get("gpus") or 0) if info.get("cuda_available") else 0
    result: dict = {"gpu_check": 1, "device": info.get("device"), "gpus": gpus, "torch": info.get("torch"),
                    "cuda": info.get("cuda"), **{part: {} for part in PARTS}, "skipped": {}}
    if info.get("error"):
        result["error"] = info["error"]
    if a.cpu:
        result["cpu"] = True
    failed, log_dir = [], None
    if not gpus and not a.cpu:
        result["skipped"] = {part: NO_GPU for part in PARTS}
    else:
        work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
        work.mkdir(parents=True, exist_ok=True)
        log_dir = Path(a.log_dir or (Path(a.out).parent / f"{Path(a.out).stem}_logs" if a.out else work / "logs"))
        skips = skip_flags(a)
        for part in PARTS:
            if part in skips:
                result["skipped"][part] = skips[part]
                continue
            left = a.budget_s - (time.monotonic() - t0)
            if left < MIN_PART_S:
                result["skipped"][part] = f"--budget-s {a.budget_s:g} spent ({left:.0f} s left)"
                continue
            timeout = min(a.timeout_s or DEFAULT_TIMEOUT_S[part], left)
            cmd, env = part_command(part, a, gpus, work)
            print(f"gpu_check: {part} (timeout {timeout:.0f} s): {' '.join(cmd[1:4])} ...", file=sys.stderr,
                  flush=True)
            run = run_part(cmd, timeout, log_dir / f"{part}.log", env)
            result[part] = summarize(part, run, work)
            if part_failed(part, result[part]):
                failed.append(part)
            print(f"gpu_check: {part} done in {run.wall_s} s (rc {run.rc}{', timed out' if run.timed_out else ''})",
                  file=sys.stderr, flush=True)
    result["failed_parts"] = failed
    result["ok"] = not failed
    result["wall_s"] = round(time.monotonic() - t0, 1)
    if log_dir is not None:
        result["log_dir"] = str(log_dir)
    line = json.dumps(result, default=str)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(line + "\n")
    print(human_summary(result), flush=True)
    print(line, flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
