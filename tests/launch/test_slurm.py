"""The SLURM launchers against a real (one-node) cluster: train.sbatch for a full run, for a run that is
signalled mid-way, requeues itself and resumes to the same losses and W&B run, for a run with a rank
killed mid-way (requeued as a crash, same losses) and for one that crashes at every attempt (stops at
MAX_CRASH_REQUEUES); prep.sbatch as dependent array jobs that make the shards of a local run.

The jobs of the tests selected run at once (`scenarios`): each test then checks what its own job did.
Most of a job's time is SLURM's (scheduling, the requeue's credential expiry, KillWait), not CPU;
one after the other they took 218 s, at once ~100 s. They share the node's CPUs (--oversubscribe,
one CPU each), so a test job sees the contention a busy node would give it."""
import json
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, losses_by_step, read_metrics, tiny_train_overrides
from tests.helpers.slurm_cluster import job_env, job_fields, submit, wait_for_state
from tests.launch.conftest import KILL_STEPS, kill_overrides, kill_rank_after_checkpoint

# slow: `make test-fast` leaves the module out; one pytest-xdist worker runs this module and the
# other SLURM one (tests/conftest.py: ONE_WORKER)
pytestmark = pytest.mark.slow

TRAIN_SBATCH = REPO / "launch/slurm/train.sbatch"
STEPS = 12
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
# A CPU node shared by the test jobs: no GPUs, one CPU each (the partition lets jobs that ask share it).
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--oversubscribe", "--time=10"]
SUBMITTED: list[int] = []  # every job of this module, cancelled at the end of `scenarios`


def _wandb_overrides(shards: Path, run_dir: Path) -> list[str]:
    return tiny_train_overrides(shards, run_dir, "logger.wandb.enabled=true", "logger.wandb.mode=offline", steps=STEPS)


@dataclass
class Job:
    """A train.sbatch job of one scenario and, once it has ended, what it left."""
    job: int
    run_dir: Path
    work: Path
    fields: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.work / f"job-{self.job}.out"

    @property
    def text(self) -> str:
        return self.log.read_text() if self.log.is_file() else ""

    def wait(self, slurm_env: dict) -> "Job":
        self.fields = wait_for_state(slurm_env, self.job, ENDED, 600, self.log)
        return self


def _submit_train(slurm_env: dict, work: Path, shards: Path,
                  overrides: Callable[[Path, Path], list[str]] = _wandb_overrides, **env: str) -> Job:
    """train.sbatch with its #SBATCH defaults overridden for the test node (CPU_JOB); `env` on top of
    the job's environment (MAX_CRASH_REQUEUES=1)."""
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    args = [*CPU_JOB, f"--output={work}/job-%j.out", str(TRAIN_SBATCH), *overrides(shards, run_dir)]
    job = job_env(slurm_env, NPROC_PER_NODE="2", LOG_DIR=str(work / "logs"), **env)
    SUBMITTED.append(submit(job, args, cwd=work))
    return Job(SUBMITTED[-1], run_dir, work)


def _wandb_runs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))


def _wait_for_step(job: Job, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ((job.run_dir / "metrics.jsonl").is_file()
               and any(m["step"] >= step and "loss" in m for m in read_metrics(job.run_dir))):
        assert time.time() < deadline, f"no step {step} within {timeout} s: {job.text[-3000:]}"
        time.sleep(0.2)


# The straight job reads its shards from the tests' S3 endpoint (moto on 127.0.0.1; set by `scenarios`),
# reached from the SLURM job through AWS_ENDPOINT_URL and the key in the job's environment, through a
# shard cache in its work folder. The other jobs read the same shards from disk and compare their
# losses with it, so every comparison also checks that the bucket gave the samples the disk gives.
S3_SHARDS: dict[str, object] = {}


def _straight(env: dict, work: Path, shards: Path) -> Job:
    url, s3_env = S3_SHARDS["url"], S3_SHARDS["env"]
    overrides = lambda _, run_dir: [*_wandb_overrides(url, run_dir), f"data.cache_dir={work}/cache"]  # noqa: E731
    return _submit_train(env, work, shards, overrides, **s3_env).wait(env)


def _plain_overrides(shards: Path, run_dir: Path) -> list[str]:
    return tiny_train_overrides(shards, run_dir, steps=STEPS)


def _signalled(scancel_args: list[str], wandb: bool = False) -> Callable[[dict, Path, Path], Job]:
    def scenario(env: dict, work: Path, shards: Path) -> Job:
        job = _submit_train(env, work, shards, _wandb_overrides if wandb else _plain_overrides)
        _wait_for_step(job, 3)
        subprocess.run(["scancel", *scancel_args, str(job.job)], env=env, check=True)
        return job.wait(env)
    return scenario


def _killed_rank(env: dict, work: Path, shards: Path) -> Job:
    job = _submit_train(env, work, shards, kill_overrides)
    job.extra["killed"] = kill_rank_after_checkpoint(job.run_dir, 1, lambda: job.text[-3000:])
    return job.wait(env)


def _crash_every_attempt(env: dict, work: Path, shards: Path) -> Job:
    return _submit_train(env, work, work / "no_such_shards", lambda shards, run: tiny_train_overrides(shards, run),
                         MAX_CRASH_REQUEUES="1").wait(env)


# Merged: `scancel --signal=TERM` without --full (TERM to the job steps only, then a requeue). Its parts
# are each run here or in test_resume.py: the same delivery and requeue as USR1 (the trainer stops on
# either, STOP_SIGNALS), SIGTERM to every process of a step, loader workers included, under real SLURM
# (cancel, TERM-full) and under torchrun (test_sigterm_to_every_process_saves_exits_75_and_resumes_bitwise).
SIGNALS = {"USR1": ["--signal=USR1"], "TERM-full": ["--full", "--signal=TERM"]}
# W&B's requeue continuity is the script's and trainer's, not the signal's: checked on the USR1 job only.
WANDB_SIGNALS = ("USR1",)
SCENARIOS: dict[str, Callable[[dict, Path, Path], Job]] = {
    "straight": _straight,
    **{f"signal-{name}": _signalled(args, name in WANDB_SIGNALS) for name, args in SIGNALS.items()},
    "cancel": _signalled([]),
    "killed_rank": _killed_rank, "crash_every_attempt": _crash_every_attempt}
# The scenarios each test reads: `scenarios` submits only those of the tests selected (`-k` one test
# runs its own job, and the straight run where it compares against it).
NEEDS = {"test_train_sbatch_runs_checkpoints_and_logs_per_rank": ["straight"],
         "test_signalled_job_requeues_resumes_and_matches_the_uninterrupted_run": ["straight", *(
             f"signal-{name}" for name in SIGNALS)],
         "test_cancelled_job_saves_within_kill_wait_and_is_not_requeued": ["straight", "cancel"],
         "test_killed_rank_requeues_the_job_as_a_crash_and_matches_the_uninterrupted_run": ["killed_rank"],
         "test_crash_at_every_attempt_stops_after_max_crash_requeues": ["crash_every_attempt"]}


@pytest.fixture(scope="module")
def scenarios(request, slurm_env, demo_shards, s3_server, s3_demo_shards, tmp_path_factory):
    """Every scenario the selected tests of this module need, started at once, one thread each; a
    test's `scenarios[name].result()` is its job once ended (or the scenario's own error). Jobs still
    running at the end (a test failed early) are cancelled."""
    module = request.node.nodeid
    names = {name for item in request.session.items if item.nodeid.startswith(module)
             for name in NEEDS.get(item.originalname, [])}
    S3_SHARDS.update(url=s3_demo_shards, env=s3_server.env)
    pool = ThreadPoolExecutor(max_workers=max(len(names), 1))
    futures: dict[str, Future] = {
        name: pool.submit(SCENARIOS[name], slurm_env, tmp_path_factory.mktemp(f"sbatch_{name}"), demo_shards)
        for name in sorted(names)}
    yield futures
    pool.shutdown(wait=True)
    if SUBMITTED:  # a job whose scenario failed before it ended; scancel of an ended job does nothing
        subprocess.run(["scancel", *map(str, SUBMITTED)], env=slurm_env, capture_output=True)
    SUBMITTED.clear()


def test_train_sbatch_runs_checkpoints_and_logs_per_rank(scenarios):
    straight = scenarios["straight"].result()
    job, run_dir, work, text = straight.job, straight.run_dir, straight.work, straight.text
    assert straight.fields["JobState"] == "COMPLETED", text[-4000:]
    assert (run_dir / "checkpoints/latest").read_text().strip() == f"step_{STEPS:08d}"
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(STEPS + 1)) and losses[STEPS][0] < losses[1][0]
    assert f"job {job} restart 0: 1 node(s) x 2" in text and "finished with status 0" in text
    rank_logs = sorted((work / "logs" / str(job) / "restart0" / "node0").glob("*/attempt_0/*/stderr.log"))
    assert [p.parent.name for p in rank_logs] == ["0", "1"] and "step" in rank_logs[0].read_text()
    assert len(_wandb_runs(run_dir)) == 1
    assert json.loads((run_dir / "config.json").read_text())["config"]["data"]["path"].startswith("s3://")
    assert list((work / "cache").glob("*-train-*.tar")), "the job read no shard through the cache"


def _straight_losses(scenarios) -> dict:
    straight = scenarios["straight"].result()
    assert straight.fields["JobState"] == "COMPLETED", straight.text[-4000:]
    return losses_by_step(straight.run_dir)


@pytest.mark.parametrize("signal_name", list(SIGNALS))
def test_signalled_job_requeues_resumes_and_matches_the_uninterrupted_run(scenarios, signal_name):
    """USR1: what SLURM sends ahead of a time limit (--signal=USR1@120), here to the job steps, loader
    workers included. TERM-full: SIGTERM (what SLURM sends on scancel and preemption) with --full, so
    the batch shell and srun get it too, and srun answers a SIGTERM by SIGKILLing its tasks (SLURM's
    own behaviour): the steps since the last checkpoint are lost, the script still requeues and the
    job resumes from that checkpoint to the same losses."""
    job = scenarios[f"signal-{signal_name}"].result()
    text = job.text
    assert job.fields["JobState"] == "COMPLETED", text[-4000:]
    assert job.fields["Restarts"] == "1" and "requeueing" in text and f"job {job.job} restart 1" in text, text[-4000:]
    if signal_name == "TERM-full":
        assert "this shell got SIGTERM" in text, text[-4000:]
        # srun SIGKILLs its tasks at once; the trainer almost never saves first, but either way the
        # job must requeue and resume from what is on disk
        assert (("the trainer did not save" in text and "are lost" in text)
                or "preempted after saving" in text), text[-4000:]
    else:
        preempted_at = json.loads(text.split("preempted after saving (")[1].split(")")[0])["step"]
        assert 3 <= preempted_at < STEPS
    assert losses_by_step(job.run_dir) == _straight_losses(scenarios)  # bitwise: fp32 on CPU
    if signal_name in WANDB_SIGNALS:
        runs = _wandb_runs(job.run_dir)
        assert len(runs) == 2 and runs[0].split("-")[-1] == runs[1].split("-")[-1]  # one W&B run id across the requeue


def test_cancelled_job_saves_within_kill_wait_and_is_not_requeued(scenarios):
    """A plain scancel: SIGTERM to every process, SIGKILL KillWait (30 s) later. The trainer saves in
    that window; the script sees that SLURM is ending the job and does not requeue it."""
    job = scenarios["cancel"].result()
    text = job.text
    assert job.fields["JobState"] == "CANCELLED" and job.fields["Restarts"] == "0", text[-4000:]
    assert "this shell got SIGTERM" in text and "not requeueing" in text, text[-4000:]
    saved = json.loads(text.split("preempted after saving (")[1].split(")")[0])
    assert 3 <= saved["step"] < STEPS
    assert (job.run_dir / "checkpoints/latest").read_text().strip() == f"step_{saved['step']:08d}"
    straight = _straight_losses(scenarios)
    assert losses_by_step(job.run_dir) == {step: straight[step] for step in range(saved["step"] + 1)}


def test_killed_rank_requeues_the_job_as_a_crash_and_matches_the_uninterrupted_run(scenarios, kill_reference):
    """kill -9 of one trainer rank past a checkpoint: torchrun (MAX_RESTARTS=0) fails the step, the
    script requeues the job as crash 1 of MAX_CRASH_REQUEUES, the requeued job resumes from latest and
    finishes with the losses of an uninterrupted run; finishing removes the crash count."""
    job = scenarios["killed_rank"].result()
    text, killed, run_dir = job.text, job.extra["killed"], job.run_dir
    assert job.fields["JobState"] == "COMPLETED" and job.fields["Restarts"] == "1", text[-4000:]
    assert killed["step"] < KILL_STEPS, killed
    assert "crash requeues 0 of 3" in text and f"job {job.job} restart 1" in text, text[-4000:]
    assert (f"trainer crashed (status 1): crash requeue 1 of 3 (MAX_CRASH_REQUEUES); the next attempt resumes "
            f"from checkpoint {killed['checkpoint']}") in text, text[-4000:]
    assert "crash requeues 1 of 3" in text and "finished with status 0" in text, text[-4000:]
    resumed = sorted((job.work / "logs" / str(job.job) / "restart1" / "node0").glob("*/attempt_0/0/stderr.log"))
    assert len(resumed) == 1 and f"resumed from {run_dir}/checkpoints/{killed['checkpoint']}" in resumed[0].read_text()
    assert not (run_dir / "crash_requeues").exists()
    assert losses_by_step(run_dir) == kill_reference  # bitwise: fp32 on CPU


def test_crash_at_every_attempt_stops_after_max_crash_requeues(scenarios, slurm_env):
    """A run that fails at every attempt (its data path does not exist) with MAX_CRASH_REQUEUES=1: one
    crash requeue, then the job ends FAILED, naming the count, the bound and the latest checkpoint."""
    job = scenarios["crash_every_attempt"].result()
    text, run_dir = job.text, job.run_dir
    assert job.fields["JobState"] == "FAILED" and job.fields["Restarts"] == "1", text[-4000:]
    assert job.fields["ExitCode"] == "1:0", job.fields
    assert "no_such_shards" in text  # the trainer's own error, in the job log
    assert "trainer crashed (status 1): crash requeue 1 of 1 (MAX_CRASH_REQUEUES)" in text, text[-4000:]
    assert (f"job {job.job} restart 1: trainer crashed (status 1) and run_dir {run_dir} has had 1 crash requeue(s) "
            "already, the bound (MAX_CRASH_REQUEUES=1); not requeueing. Latest checkpoint: none.") in text, text[-4000:]
    assert text.count("requeueing") == 2 and f"job {job.job} restart 2" not in text  # 1 requeue + "not requeueing"
    assert (run_dir / "crash_requeues").read_text().strip() == "1"  # kept for a job that continues the run_dir
    time.sleep(3)
    assert job_fields(slurm_env, job.job)["JobState"] == "FAILED"  # ended, not requeued once more


def _prep_arrays(env: dict, work: Path, shards: Path) -> Job:
    """launch/slurm/prep.sh with 2 tasks per stage on a synthetic corpus; the Job of its last stage,
    the stage jobs in `extra`."""
    from tests.data_prep.test_pipeline import synthetic_corpus

    corpus = synthetic_corpus(work / "corpus")
    pattern = f"{corpus}/train/chunk*/example_train_*.jsonl.zst"
    out = work / "slurm"
    overrides = [f"inputs=[{pattern}]", f"input_root={corpus}", f"output_dir={out}", "seq_len=32",
                 "samples_per_shard=40", "holdout.ratio=0.02", "tokenizer.vocab_size=300", "tokenizer.threads=1"]
    extra = f"--output={work}/prep-%x-%A_%a.out --cpus-per-task=1 --oversubscribe --mem-per-cpu=1G --time=10"
    job = job_env(env, PYTHON=sys.executable, SBATCH_EXTRA=extra,
                  BIG_MEM_GB="1", TOKENIZER_CPUS="1")  # a one-node test cluster, not a 64 GB node
    proc = subprocess.run(["bash", str(REPO / "launch/slurm/prep.sh"), "2", *overrides], cwd=work, env=job,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = dict(line.split(": job ")[0:2] for line in proc.stdout.splitlines() if ": job " in line)
    SUBMITTED.extend(int(ids.split()[0]) for ids in jobs.values())
    last = Job(int(jobs["report"].split()[0]) if "report" in jobs else 0, out, work,
               extra={"jobs": jobs, "corpus": corpus, "pattern": pattern})
    if last.job:
        last.fields = wait_for_state(env, last.job, ENDED, 900)
    return last


SCENARIOS["prep_arrays"] = _prep_arrays
NEEDS["test_prep_sbatch_array_jobs_make_the_shards_of_a_local_run"] = ["prep_arrays"]


def test_prep_sbatch_array_jobs_make_the_shards_of_a_local_run(scenarios, slurm_env, tmp_path):
    """launch/slurm/prep.sh submits every stage as an array job (2 tasks) depending on the one before;
    the shards equal those of the same config run locally in one process pool."""
    from data_prep.prep import run_prep
    from data_prep.stages import STAGES
    from tests.data_prep.test_pipeline import _cfg, _tars

    prep = scenarios["prep_arrays"].result()
    jobs = prep.extra["jobs"]
    assert tuple(jobs) == tuple(s.name for s in STAGES)  # every stage, in order
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(prep.work.glob("prep-*.out")))
    assert prep.fields["JobState"] == "COMPLETED", logs
    clean = job_fields(slurm_env, int(jobs["clean"].split()[0]))
    assert clean.get("ArrayTaskId") in ("0", "1")  # an array job, one record per task
    local = _cfg(prep.extra["corpus"], tmp_path / "local", num_tasks=2, holdout_ratio=0.02,
                 inputs=[prep.extra["pattern"]])
    run_prep(local)
    assert _tars(prep.run_dir) and _tars(prep.run_dir) == _tars(tmp_path / "local")
