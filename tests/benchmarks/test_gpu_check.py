"""benchmarks/gpu_check.py on a machine without a GPU: its arguments, its JSON line, the skip reasons,
the parsing of each part's output, the timeout, and (``--cpu``) the whole flow through real parts."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from benchmarks import bench_mfu, bench_nccl, bench_train, gpu_check
from tests.conftest import REPO

KEYS = {"gpu_check", "device", "gpus", "torch", "cuda", "tests", "nccl", "mfu", "bench_train", "skipped", "ok",
        "wall_s", "failed_parts"}
GPU_HOST = {"cuda_available": True, "gpus": 8, "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130",
            "cuda": "13.0"}
NO_GPU_HOST = {"cuda_available": False, "gpus": 0, "device": "cpu", "torch": "2.13.0+cpu", "cuda": None}


def _main(argv, info, capsys) -> tuple[int, dict, str]:
    rc = gpu_check.main(argv, info=info)
    out = capsys.readouterr().out
    return rc, json.loads(out.strip().splitlines()[-1]), out


def test_parse_args():
    a = gpu_check.parse_args([])
    assert a.models == ["125m", "350m", "1.3b", "7b"] and a.steps == 50 and a.warmup == 10
    assert not (a.skip_tests or a.skip_mfu or a.skip_nccl or a.skip_train or a.cpu or a.compile)
    assert a.out is None and a.timeout_s is None and a.budget_s == 480 and a.mfu_nproc == 1
    a = gpu_check.parse_args(["--models", "125m", "--steps", "60", "--skip-tests", "--skip-mfu", "--skip-nccl",
                              "--out", "x.json", "--timeout-s", "90", "--pytest-args", "-k", "sdpa"])
    assert a.models == ["125m"] and a.steps == 60 and a.out == "x.json" and a.timeout_s == 90
    assert gpu_check.skip_flags(a) == {"tests": "--skip-tests", "mfu": "--skip-mfu", "nccl": "--skip-nccl"}
    assert a.pytest_args == ["-k", "sdpa"]
    for bad in (["--steps", "0"], ["--timeout-s", "0"], ["--budget-s", "-1"], ["--nproc", "0"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_no_gpu_every_part_skipped_exit_0(capsys, tmp_path):
    out_file = tmp_path / "sub/gpu.json"
    rc, result, printed = _main(["--out", str(out_file)], NO_GPU_HOST, capsys)
    assert rc == 0 and KEYS <= set(result) and result["gpu_check"] == 1 and result["ok"]
    assert result["skipped"] == {part: "no CUDA GPU" for part in ("nccl", "tests", "bench_train", "mfu")}
    assert all(result[part] == {} for part in ("nccl", "tests", "bench_train", "mfu"))
    assert result["gpus"] == 0 and result["torch"] == "2.13.0+cpu" and result["cuda"] is None
    assert json.loads(out_file.read_text()) == result
    assert "skipped: no CUDA GPU" in printed  # the human summary precedes the JSON line


def test_the_real_script_on_this_machine(tmp_path):
    """The script itself, asking torch in a subprocess: here (no GPU) one JSON line, everything skipped."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--out", str(tmp_path / "o.json")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(result) and set(result["skipped"].values()) == {"no CUDA GPU"}
    assert result["torch"] and result["device"] == "cpu"


def test_skip_flags_and_budget_on_a_gpu_host(capsys, tmp_path, monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("no part should run")

    monkeypatch.setattr(gpu_check, "run_part", no_run)
    rc, result, _ = _main(["--skip-tests", "--skip-mfu", "--skip-nccl", "--skip-train", "--work-dir", str(tmp_path)],
                          GPU_HOST, capsys)
    assert rc == 0 and result["gpus"] == 8 and result["device"] == GPU_HOST["device"] and result["cuda"] == "13.0"
    assert result["skipped"] == {"nccl": "--skip-nccl", "tests": "--skip-tests", "bench_train": "--skip-train",
                                 "mfu": "--skip-mfu"}
    rc, result, _ = _main(["--budget-s", "5", "--work-dir", str(tmp_path)], GPU_HOST, capsys)
    assert rc == 0 and all("--budget-s 5 spent" in r for r in result["skipped"].values())


def test_gpu_mode_commands_parse_in_the_scripts(tmp_path):
    """What gpu_check runs on a GPU host is accepted by each script's own parser."""
    a = gpu_check.parse_args(["--models", "125m", "7b", "--steps", "55", "--compile", "--mfu-nproc", "2"])
    cmds = {part: gpu_check.part_command(part, a, 8, tmp_path) for part in gpu_check.PARTS}
    m = bench_mfu.parse_args(cmds["mfu"][0][2:])
    assert (m.models, m.steps, m.warmup, m.nproc, m.compile, m.device) == (["125m", "7b"], 55, 10, 2, True, "cuda")
    t = bench_train.parse_args(cmds["bench_train"][0][2:])
    assert t.device == "cuda" and t.synthetic and t.precision is None  # bf16 on CUDA
    n = bench_nccl.parse_args(cmds["nccl"][0][2:])
    assert n.nproc == 8 and n.device == "cuda" and n.sizes_mb[0] == 8 and n.sizes_mb[-1] == 1024
    pytest_cmd, env = cmds["tests"]
    assert pytest_cmd[1:3] == ["-m", "pytest"] and "gpu" in pytest_cmd and "tests/gpu" in pytest_cmd
    assert pytest_cmd[pytest_cmd.index("--confcutdir") + 1] == "tests/gpu"  # tests/conftest.py stays out
    assert env["GPU_CHECK_RECORD"] == str(tmp_path / "records.jsonl") and env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"]


def test_mfu_part_runs_the_shape_the_readme_reports(tmp_path):
    """The README's MFU table is for "micro-batch B × seq T": the command gpu-check runs on a GPU host
    passes that B and T to bench_mfu (whose own default micro-batch differs), so the two cannot drift."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**On a GPU host** `make gpu-check`"):]
    section = section[:section.index("| model |")]  # the paragraph that introduces the MFU table
    shapes = re.findall(r"micro-batch (\d+) × seq (\d+)", section)
    assert len(shapes) == 1, shapes
    micro, seq = map(int, shapes[0])
    cmd, _ = gpu_check.part_command("mfu", gpu_check.parse_args([]), 1, tmp_path)
    m = bench_mfu.parse_args(cmd[2:])
    assert (m.micro_batch, m.seq_len) == (micro, seq) == (gpu_check.MFU_MICRO_BATCH, gpu_check.MFU_SEQ_LEN)


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="1"
 skipped="1" tests="5" time="12.3">
<testcase classname="tests.gpu.test_a" name="test_ok" time="1.5"/>
<testcase classname="tests.gpu.test_a" name="test_ok2[x]" time="0.5"/>
<testcase classname="tests.gpu.test_b" name="test_bad[hd64]" time="2.0"><failure message="assert 1 == 2">tb</failure>
</testcase>
<testcase classname="tests.gpu.test_b" name="test_err" time="0.1"><error message="fixture failed">tb2</error>
</testcase>
<testcase classname="tests.gpu.test_c" name="test_skip" time="0"><skipped message="no CUDA GPU"/></testcase>
</testsuite></testsuites>"""


def test_junit_summary(tmp_path):
    (tmp_path / "junit.xml").write_text(JUNIT)
    (tmp_path / "records.jsonl").write_text(json.dumps({"test": "tests/gpu/test_a.py::test_ok", "diff": 0.001})
                                            + "\n")
    run = gpu_check.PartRun(rc=1, stdout="", stderr="", wall_s=12.5, timed_out=False)
    s = gpu_check.summarize("tests", run, tmp_path)
    assert (s["passed"], s["failed"], s["errors"], s["skipped"], s["total"]) == (2, 1, 1, 1, 5)
    assert s["failures"] == ["tests/gpu/test_b.py::test_bad[hd64]", "tests/gpu/test_b.py::test_err"]
    assert s["failure_messages"]["tests/gpu/test_b.py::test_bad[hd64]"].startswith("assert 1 == 2")
    assert s["skip_reasons"] == {"no CUDA GPU": 1} and s["records"][0]["diff"] == 0.001
    assert "error" not in s  # failed tests are counted, not a broken part
    assert gpu_check.part_failed("tests", s)
    line = gpu_check.fmt_part("tests", s)
    assert "2 passed, 1 failed, 1 errors, 1 skipped" in line and "test_bad[hd64]" in line


def test_mfu_rows_survive_a_timeout(tmp_path):
    rows = [{"model": "125m", "mfu_palm": 0.5, "mfu_megatron": 0.45, "tokens_s_per_gpu": 1e5, "peak_mem_gb": 9.0},
            {"model": "7b", "skipped": "out of memory: CUDA out of memory"}]
    stdout = "table\n" + "".join(json.dumps({"row": r}) + "\n" for r in rows)
    s = gpu_check.summarize("mfu", gpu_check.PartRun(None, stdout, "killed", 300.0, True), tmp_path)
    assert s["rows"] == rows and s["complete"] is False and s["timed_out"] and gpu_check.part_failed("mfu", s)
    assert "125m MFU 50.0% PaLM / 45.0% Megatron" in gpu_check.fmt_part("mfu", s)
    final = {"bench": "mfu", "rows": rows}
    s = gpu_check.summarize("mfu", gpu_check.PartRun(0, stdout + json.dumps(final), "", 90.0, False), tmp_path)
    assert s["rows"] == rows and s["rc"] == 0 and not gpu_check.part_failed("mfu", s)


def test_run_part_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time\n"
              f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
              "print('started', flush=True)\ntime.sleep(120)\n")
    t0 = time.monotonic()
    run = gpu_check.run_part([sys.executable, "-c", script], 3, tmp_path / "logs/x.log", gpu_check.child_env())
    assert run.timed_out and time.monotonic() - t0 < 30 and "started" in run.stdout
    assert "TIMED OUT" in (tmp_path / "logs/x.log").read_text()
    pid = int(pid_file.read_text())
    for _ in range(50):  # the grandchild (a torchrun rank, say) died with the group
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"grandchild {pid} survived the timeout")


@pytest.mark.slow
def test_cpu_plumbing_flow(tmp_path):
    """``--cpu``: real parts (NCCL bench over gloo with 2 ranks, the GPU tests, which all skip here),
    their JSON collected into the one line; bench_train and bench_mfu run in test_benchmarks.py."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--cpu", "--skip-mfu",
                           "--skip-train", "--out", str(tmp_path / "r.json"), "--work-dir", str(tmp_path / "w")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(result) and result["ok"] and result["cpu"]
    assert result["skipped"] == {"bench_train": "--skip-train", "mfu": "--skip-mfu"}
    nccl = result["nccl"]
    assert nccl["ranks"] == 2 and nccl["rc"] == 0 and len(nccl["rows"]) == 2
    for row in nccl["rows"]:
        assert row["busbw_gbs"] == pytest.approx(row["algbw_gbs"])  # 2 (n - 1) / n = 1 for n = 2
    tests = result["tests"]
    assert tests["total"] == tests["skipped"] > 0 and tests["failed"] == tests["errors"] == 0
    assert list(tests["skip_reasons"]) == ["no CUDA GPU (torch.cuda.is_available() is False); "
                                           "run on a GPU host: make gpu-check"]
    assert (tmp_path / "r_logs/nccl.log").is_file() and (tmp_path / "r_logs/tests.log").is_file()
