"""Shared fixtures: a small real corpus and its shards, built once per test session."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import zstandard

from data_prep.config import DecontamConfig, HoldoutConfig, PrepConfig, RunConfig
from data_prep.demo_corpus import build_demo_corpus
from data_prep.prep import run_prep
from data_prep.tokenizer import TokenizerConfig
from tests.helpers.built_once import built_once

REPO = Path(__file__).resolve().parents[1]
# `make test-fast` sets this: the session fails if the fast suite leaves a project module untouched.
TOUCH_CHECK = os.environ.get("SLIMPAJAMA_TOUCH_CHECK") == "1"


def pytest_configure(config: pytest.Config) -> None:
    if TOUCH_CHECK:
        from tests.helpers import touched

        if hasattr(config, "workerinput"):  # a pytest-xdist worker: it records into its controller's folder
            config._touch_worker = True
            return
        config._touch_dir = Path(config.rootpath) / ".pytest_touch" / str(os.getpid())
        touched.start(config._touch_dir)


# Test modules that share the one-node SLURM cluster: one pytest-xdist worker runs them, one after the
# other (test_local_cluster's stand-ins named like the daemons would look, to a worker starting the
# cluster beside them, like a controller it did not start; test_slurm submits its jobs at once).
ONE_WORKER = ("tests/launch/test_local_cluster.py::", "tests/launch/test_slurm.py::")


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup`` (make test): every test its own unit of work, sent to whichever worker is
    free, except the modules of ONE_WORKER, one unit together. Not xdist's own loadgroup: xdist 3.8
    marks a group by rewriting ``item._nodeid``, which pytest 9 no longer reads, so its groups
    silently split across workers."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "slurm-cluster" if nodeid.startswith(ONE_WORKER) else nodeid

    return Scheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the slow tests first (their order kept, and the rest's): workers take the
    next test when they are free, so the long ones (rank launches, SLURM jobs, timeouts) start while
    there is still other work to overlap them, and the session ends on short tests, not with one
    worker idle beside a long one (the last 30 s of a session were three launcher tests on one worker)."""
    if hasattr(config, "workerinput"):  # an xdist worker: the workers collect, the controller schedules
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: False (slow) first


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if getattr(session.config, "_touch_worker", False):
        from tests.helpers import touched

        touched.record_this_process()  # before the worker reports back: the controller checks next
        return
    touch_dir = getattr(session.config, "_touch_dir", None)
    if touch_dir is None or exitstatus != 0:
        return
    from tests.helpers import touched

    missing = touched.untouched(touch_dir)
    shutil.rmtree(touch_dir.parent, ignore_errors=True)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reporter.write_line("")  # end the progress line
    if missing:
        reporter.write_line(f"the fast suite touched none of these modules: {', '.join(missing)}", red=True)
        session.exitstatus = 1
    else:
        reporter.write_line(f"the fast suite touched all {len(touched.project_modules())} project modules")


def write_jsonl_zst(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(payload))
    return path


# Test shorthand for nested PrepConfig fields: num_tasks=2 means run.num_tasks=2.
_NESTED = {"num_tasks": ("run", "num_tasks"), "workers": ("run", "workers"), "force": ("run", "force"),
           "local_dir": ("run", "local_dir"),
           "holdout_ratio": ("holdout", "ratio"), "holdout_count": ("holdout", "count"),
           "eval_files": ("decontam", "eval_files")}
_GROUPS = {"run": RunConfig, "holdout": HoldoutConfig, "decontam": DecontamConfig}


def small_prep_config(corpus: Path, out: Path, **overrides) -> PrepConfig:
    base = dict(
        inputs=[str(corpus / "train")],
        input_root=str(corpus),
        output_dir=str(out),
        seq_len=64,
        samples_per_shard=256,
        holdout_ratio=0.05,
        tokenizer=TokenizerConfig(vocab_size=1000, max_sample_bytes=2_000_000, threads=2),
    )
    base.update(overrides)
    groups: dict[str, dict] = {g: {} for g in _GROUPS}
    for flat, (group, name) in _NESTED.items():
        if flat in base:
            groups[group][name] = base.pop(flat)
    return PrepConfig(**base, **{g: _GROUPS[g](**kw) for g, kw in groups.items() if kw})


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """The demo corpus capped at 400 kB per source: every source present, seconds to build."""
    return built_once(tmp_path_factory, "demo_corpus",
                      lambda out: build_demo_corpus(out, max_bytes_per_source=400_000, docs_per_file=200))


@pytest.fixture(scope="session")
def demo_shards(demo_corpus, tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "demo_shards", lambda out: run_prep(small_prep_config(demo_corpus, out)))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (tests/helpers/s3_server.py), one per test process, stopped at the end."""
    from tests.helpers.s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3") / "moto_server.log")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The S3 server's variables in this process's environment, for clients in the test process
    (s3fs's cached clients dropped before and after: they keep the credentials they were made with)."""
    import s3fs

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_demo_shards(s3_server, demo_shards) -> str:
    """The demo shards uploaded once per test process to ``s3://demo/shards``; read-only (a test that
    changes objects uploads its own copy)."""
    s3_server.make_bucket("demo")
    return s3_server.upload(demo_shards, "s3://demo/shards")


def tiny_train_overrides(shards: Path, run_dir: Path, *extra: str, backend: str = "fsdp2", steps: int = 8) -> list[str]:
    """Hydra overrides for a tiny fp32 run (seconds on CPU) that evaluates and checkpoints every 4 steps."""
    return [
        f"data.path={shards}", f"run_dir={run_dir}", f"backend={backend}", "backend.precision=fp32",
        "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "data.micro_batch_size=2",
        "data.num_workers=1", "trainer.global_batch_size=8", f"trainer.max_steps={steps}", "trainer.log_interval=1",
        "trainer.eval_interval=4", "trainer.eval_batches=1", "checkpoint.interval=4", "checkpoint.keep_last=5",
        "optim.warmup_steps=2", "optim.lr=3e-3", "logger.wandb.enabled=false", *extra,
    ]


class TinyRuns:
    """Uninterrupted tiny runs (:func:`tiny_train_overrides`), each trained once per session (whichever
    worker asks first: :func:`built_once`) and shared by every module that compares against it (resume,
    integrity, multi-node). Shared means read-only: a test that changes a run copies it first."""

    def __init__(self, shards: Path, factory: pytest.TempPathFactory) -> None:
        self.shards, self.factory = shards, factory
        self._runs: dict[tuple[str, int, int], Path] = {}

    def get(self, backend: str = "fsdp2", nproc: int = 2, steps: int = 8, *extra: str) -> Path:
        """The run; ``extra``: overrides on top of the tiny ones (e.g. another data order)."""
        key = (backend, nproc, steps, *extra)
        if key not in self._runs:
            from tests.helpers.launch import run_ranks

            name = "_".join([f"tiny_{backend}_{nproc}proc_{steps}", *(e.replace("=", "-") for e in extra)])
            self._runs[key] = built_once(self.factory, name, lambda run_dir: run_ranks(
                nproc, tiny_train_overrides(self.shards, run_dir, *extra, backend=backend, steps=steps)))
        return self._runs[key]


@pytest.fixture(scope="session")
def tiny_runs(demo_shards, tmp_path_factory) -> TinyRuns:
    return TinyRuns(demo_shards, tmp_path_factory)


def losses_by_step(run_dir: Path) -> dict[int, tuple]:
    """(train loss, val loss) per step; the last record wins (a killed run leaves records that the
    resumed run rewrites)."""
    return {m["step"]: (m.get("loss"), m.get("val_loss")) for m in read_metrics(run_dir)}


def rank_exit_statuses(status_dir: Path) -> dict[int, int]:
    """Each rank's exit status, as written by EXIT_STATUS_HELPER (rank -> status; -N: killed by signal N)."""
    return {int(p.name.removeprefix("rank")): int(p.read_text()) for p in sorted(status_dir.glob("rank*"))}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def halted_copy(run_dir: Path, dst: Path, step: int) -> Path:
    """``dst`` as ``run_dir`` would have been had it been stopped after ``step`` (``trainer.halt_at_step``):
    its checkpoints up to ``step`` with ``latest`` naming that one, its metrics records up to ``step``,
    its other files as they are. For a resume test whose first leg an uninterrupted shared run already
    trained (the steps up to the halt are the same: the schedule and the order depend on ``max_steps``,
    not on the halt). A copy: resuming writes next to the checkpoint (ZeRO's universal conversion)."""
    name = f"step_{step:08d}"
    if not (run_dir / "checkpoints" / name).is_dir():
        raise FileNotFoundError(f"{run_dir} has no checkpoint at step {step}")
    dst.mkdir(parents=True, exist_ok=True)
    for item in run_dir.iterdir():
        if item.name == "checkpoints":
            for ckpt in item.glob("step_*"):
                if int(ckpt.name.removeprefix("step_")) <= step:
                    shutil.copytree(ckpt, dst / "checkpoints" / ckpt.name)
            (dst / "checkpoints/latest").write_text(name + "\n")
        elif item.name == "metrics.jsonl":
            kept = [line for line in item.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
            (dst / item.name).write_text("".join(line + "\n" for line in kept))
        elif item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)
    return dst
