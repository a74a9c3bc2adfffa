"""The SLURM launchers against a real (one-node) cluster: train.sbatch for a full run, for a run that is
signalled mid-way, requeues itself and resumes to the same losses and W&B run, for a run with a rank
killed mid-way (requeued as a crash, same losses) and for one that crashes at every attempt (stops at
MAX_CRASH_REQUEUES); prep.sbatch as dependent array jobs that make the shards of a local run."""
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, losses_by_step, read_metrics, tiny_train_overrides
from tests.helpers.slurm_cluster import job_env, job_fields, submit, wait_for_state
from tests.launch.conftest import KILL_STEPS, kill_overrides, kill_rank_after_checkpoint

pytestmark = pytest.mark.slow  # every test here: `make test-fast` leaves the module out

TRAIN_SBATCH = REPO / "launch/slurm/train.sbatch"
STEPS = 12
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def _wandb_overrides(shards: Path, run_dir: Path) -> list[str]:
    return tiny_train_overrides(shards, run_dir, "logger.wandb.enabled=true", "logger.wandb.mode=offline", steps=STEPS)


def _submit_train(slurm_env: dict, work: Path, shards: Path,
                  overrides: Callable[[Path, Path], list[str]] = _wandb_overrides, **env: str) -> tuple[int, Path]:
    """train.sbatch with its #SBATCH defaults overridden for a CPU node: no GPUs, 2 CPUs, 10 minutes;
    `env` on top of the job's environment (MAX_CRASH_REQUEUES=1)."""
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    args = ["--gpus-per-node=0", "--cpus-per-task=2", "--time=10", f"--output={work}/job-%j.out", str(TRAIN_SBATCH),
            *overrides(shards, run_dir)]
    job = job_env(slurm_env, NPROC_PER_NODE="2", LOG_DIR=str(work / "logs"), **env)
    return submit(job, args, cwd=work), run_dir


def _wandb_runs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, demo_shards, tmp_path_factory) -> tuple[int, Path, Path]:
    work = tmp_path_factory.mktemp("sbatch_straight")
    job, run_dir = _submit_train(slurm_env, work, demo_shards)
    fields = wait_for_state(slurm_env, job, ENDED, 600,
                            work / f"job-{job}.out")
    assert fields["JobState"] == "COMPLETED", (work / f"job-{job}.out").read_text()[-4000:]
    return job, run_dir, work


def test_train_sbatch_runs_checkpoints_and_logs_per_rank(uninterrupted, slurm_env):
    job, run_dir, work = uninterrupted
    assert (run_dir / "checkpoints/latest").read_text().strip() == f"step_{STEPS:08d}"
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(STEPS + 1)) and losses[STEPS][0] < losses[1][0]
    log = (work / f"job-{job}.out").read_text()
    assert f"job {job} restart 0: 1 node(s) x 2" in log and "finished with status 0" in log
    rank_logs = sorted((work / "logs" / str(job) / "restart0" / "node0").glob("*/attempt_0/*/stderr.log"))
    assert [p.parent.name for p in rank_logs] == ["0", "1"] and "step" in rank_logs[0].read_text()
    assert len(_wandb_runs(run_dir)) == 1


def _wait_for_step(run_dir: Path, step: int, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ((run_dir / "metrics.jsonl").is_file()
               and any(m["step"] >= step and "loss" in m for m in read_metrics(run_dir))):
        assert time.time() < deadline, (
            f"no step {step} within {timeout} s: {log.read_text()[-3000:] if log.is_file() else ''}")
        time.sleep(0.2)


@pytest.mark.parametrize("scancel_args", [["--signal=USR1"], ["--signal=TERM"], ["--full", "--signal=TERM"]],
                         ids=["USR1", "TERM", "TERM-full"])
def test_signalled_job_requeues_resumes_and_matches_the_uninterrupted_run(uninterrupted, slurm_env, demo_shards,
                                                                          tmp_path, scancel_args):
    """USR1: what SLURM sends ahead of a time limit (--signal=USR1@120). TERM: what it sends to every
    process of the job, loader workers included, on scancel and preemption. Without --full only the
    job steps get the signal; with it the batch shell and srun get it too, and srun answers a SIGTERM
    by SIGKILLing its tasks (SLURM's own behaviour), so the steps since the last checkpoint are lost:
    the script still requeues and the job resumes from that checkpoint to the same losses."""
    _, straight_dir, _ = uninterrupted
    job, run_dir = _submit_train(slurm_env, tmp_path, demo_shards)
    log = tmp_path / f"job-{job}.out"
    _wait_for_step(run_dir, 3, log)
    subprocess.run(["scancel", *scancel_args, str(job)], env=slurm_env, check=True)
    fields = wait_for_state(slurm_env, job, ENDED, 600, log)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", text[-4000:]
    assert fields["Restarts"] == "1" and "requeueing" in text and f"job {job} restart 1" in text, text[-4000:]
    if "--full" in scancel_args:
        assert "this shell got SIGTERM" in text, text[-4000:]
        # srun SIGKILLs its tasks at once; the trainer almost never saves first, but either way the
        # job must requeue and resume from what is on disk
        assert (("the trainer did not save" in text and "are lost" in text)
                or "preempted after saving" in text), text[-4000:]
    else:
        preempted_at = json.loads(text.split("preempted after saving (")[1].split(")")[0])["step"]
        assert 3 <= preempted_at < STEPS
    assert losses_by_step(run_dir) == losses_by_step(straight_dir)  # bitwise: fp32 on CPU
    runs = _wandb_runs(run_dir)
    assert len(runs) == 2 and runs[0].split("-")[-1] == runs[1].split("-")[-1]  # one W&B run id across the requeue


def test_cancelled_job_saves_within_kill_wait_and_is_not_requeued(uninterrupted, slurm_env, demo_shards, tmp_path):
    """A plain scancel: SIGTERM to every process, SIGKILL KillWait (30 s) later. The trainer saves in
    that window; the script sees that SLURM is ending the job and does not requeue it."""
    _, straight_dir, _ = uninterrupted
    job, run_dir = _submit_train(slurm_env, tmp_path, demo_shards)
    log = tmp_path / f"job-{job}.out"
    _wait_for_step(run_dir, 3, log)
    subprocess.run(["scancel", str(job)], env=slurm_env, check=True)
    fields = wait_for_state(slurm_env, job, ENDED, 600, log)
    text = log.read_text()
    assert fields["JobState"] == "CANCELLED" and fields["Restarts"] == "0", text[-4000:]
    assert "this shell got SIGTERM" in text and "not requeueing" in text, text[-4000:]
    saved = json.loads(text.split("preempted after saving (")[1].split(")")[0])
    assert 3 <= saved["step"] < STEPS
    assert (run_dir / "checkpoints/latest").read_text().strip() == f"step_{saved['step']:08d}"
    straight = losses_by_step(straight_dir)
    assert losses_by_step(run_dir) == {step: straight[step] for step in range(saved["step"] + 1)}


def test_killed_rank_requeues_the_job_as_a_crash_and_matches_the_uninterrupted_run(slurm_env, kill_reference,
                                                                                    demo_shards, tmp_path):
    """kill -9 of one trainer rank past a checkpoint: torchrun (MAX_RESTARTS=0) fails the step, the
    script requeues the job as crash 1 of MAX_CRASH_REQUEUES, the requeued job resumes from latest and
    finishes with the losses of an uninterrupted run; finishing removes the crash count."""
    job, run_dir = _submit_train(slurm_env, tmp_path, demo_shards, kill_overrides)
    log = tmp_path / f"job-{job}.out"
    killed = kill_rank_after_checkpoint(run_dir, 1, lambda: log.read_text()[-3000:] if log.is_file() else "")
    fields = wait_for_state(slurm_env, job, ENDED, 600, log)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", text[-4000:]
    assert killed["step"] < KILL_STEPS, killed
    assert "crash requeues 0 of 3" in text and f"job {job} restart 1" in text, text[-4000:]
    assert (f"trainer crashed (status 1): crash requeue 1 of 3 (MAX_CRASH_REQUEUES); the next attempt resumes "
            f"from checkpoint {killed['checkpoint']}") in text, text[-4000:]
    assert "crash requeues 1 of 3" in text and "finished with status 0" in text, text[-4000:]
    resumed = sorted((tmp_path / "logs" / str(job) / "restart1" / "node0").glob("*/attempt_0/0/stderr.log"))
    assert len(resumed) == 1 and f"resumed from {run_dir}/checkpoints/{killed['checkpoint']}" in resumed[0].read_text()
    assert not (run_dir / "crash_requeues").exists()
    assert losses_by_step(run_dir) == kill_reference  # bitwise: fp32 on CPU


def test_crash_at_every_attempt_stops_after_max_crash_requeues(slurm_env, tmp_path):
    """A run that fails at every attempt (its data path does not exist) with MAX_CRASH_REQUEUES=1: one
    crash requeue, then the job ends FAILED, naming the count, the bound and the latest checkpoint."""
    job, run_dir = _submit_train(slurm_env, tmp_path, tmp_path / "no_such_shards",
                                 lambda shards, run: tiny_train_overrides(shards, run), MAX_CRASH_REQUEUES="1")
    log = tmp_path / f"job-{job}.out"
    fields = wait_for_state(slurm_env, job, ENDED, 600, log)
    text = log.read_text()
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "1", text[-4000:]
    assert fields["ExitCode"] == "1:0", fields
    assert "no_such_shards" in text  # the trainer's own error, in the job log
    assert "trainer crashed (status 1): crash requeue 1 of 1 (MAX_CRASH_REQUEUES)" in text, text[-4000:]
    assert (f"job {job} restart 1: trainer crashed (status 1) and run_dir {run_dir} has had 1 crash requeue(s) "
            "already, the bound (MAX_CRASH_REQUEUES=1); not requeueing. Latest checkpoint: none.") in text, text[-4000:]
    assert text.count("requeueing") == 2 and f"job {job} restart 2" not in text  # 1 requeue + "not requeueing"
    assert (run_dir / "crash_requeues").read_text().strip() == "1"  # kept for a job that continues the run_dir
    time.sleep(3)
    assert job_fields(slurm_env, job)["JobState"] == "FAILED"  # ended, not requeued once more


def test_prep_sbatch_array_jobs_make_the_shards_of_a_local_run(slurm_env, tmp_path):
    """launch/slurm/prep.sh submits every stage as an array job (2 tasks) depending on the one before;
    the shards equal those of the same config run locally in one process pool."""
    from data_prep.prep import run_prep
    from data_prep.stages import STAGES
    from tests.data_prep.test_pipeline import _cfg, _tars, synthetic_corpus

    corpus = synthetic_corpus(tmp_path / "corpus")
    pattern = f"{corpus}/train/chunk*/example_train_*.jsonl.zst"
    out = tmp_path / "slurm"
    overrides = [f"inputs=[{pattern}]", f"input_root={corpus}", f"output_dir={out}", "seq_len=32",
                 "samples_per_shard=40", "holdout.ratio=0.02", "tokenizer.vocab_size=300", "tokenizer.threads=1"]
    env = job_env(slurm_env, PYTHON=sys.executable,
                  SBATCH_EXTRA=f"--output={tmp_path}/prep-%x-%A_%a.out --cpus-per-task=1 --mem-per-cpu=1G --time=10",
                  BIG_MEM_GB="1", TOKENIZER_CPUS="1")  # a one-node test cluster, not a 64 GB node
    proc = subprocess.run(["bash", str(REPO / "launch/slurm/prep.sh"), "2", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = dict(line.split(": job ")[0:2] for line in proc.stdout.splitlines() if ": job " in line)
    assert tuple(jobs) == tuple(s.name for s in STAGES)  # every stage, in order
    last = int(jobs["report"].split()[0])
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(tmp_path.glob("prep-*.out")))
    fields = wait_for_state(slurm_env, last, ENDED, 900)
    assert fields["JobState"] == "COMPLETED", logs
    clean = job_fields(slurm_env, int(jobs["clean"].split()[0]))
    assert clean.get("ArrayTaskId") in ("0", "1")  # an array job, one record per task
    local = _cfg(corpus, tmp_path / "local", num_tasks=2, holdout_ratio=0.02, inputs=[pattern])
    run_prep(local)
    assert _tars(out) and _tars(out) == _tars(tmp_path / "local")
