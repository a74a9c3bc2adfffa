"""Checkpoints and resume: exact (clean stop and kill -9), elastic, crash-safe, preemption (O(1) resume:
test_data.py::test_resume_at_sample_1e9_costs_what_a_fresh_start_costs)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from slimpajama_train.checkpoint import CheckpointConfig, CheckpointStore, CorruptCheckpointError, read_meta
from tests.conftest import REPO, halted_copy, losses_by_step, rank_exit_statuses, read_metrics, tiny_train_overrides
from tests.helpers.built_once import built_once
from tests.helpers.equivalence import assert_bitwise_same, compare
from tests.helpers.launch import HELPERS, kill_tree, launch_env, run_ranks, start_torchrun

STEPS = 8
# ZeRO-1 and ZeRO-2 run the same DeepSpeed optimizer class (DeepSpeedZeroOptimizer) and write the same
# checkpoint files (our backend branches only on stage 3), and neither a clean stop, a kill nor an
# elastic resume has a backend path that tells them apart: every resume case here covers stage 2 for
# both. ZeRO-1 keeps its own training cells (test_backends.py: the layout equivalence, bf16 with fp32
# reduction, the skipped non-finite step; test_init.py).
BACKENDS = ["fsdp2", "zero2", "zero3"]


def _overrides(shards: Path, run_dir: Path, backend: str, *extra: str) -> list[str]:
    return tiny_train_overrides(shards, run_dir, *extra, backend=backend, steps=STEPS)


def _env(**extra) -> dict:
    return launch_env(extra)


CRASH_HELPER = HELPERS / "crash_helper.py"


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """The trainer processes torchrun started (its direct children)."""
    return psutil.Process(proc.pid).children()


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(m["step"] >= step and "loss" in m for m in read_metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    kill_tree(proc.pid)  # torchrun and every rank: their output pipes close, and the tail says where it stalled
    raise AssertionError(f"no step {step} within {timeout} s; killed the run:\n{proc.stderr.read()[-6000:]}")


# The sample orders the resume cases run in (data.order; blocks: 4 of the demo's 33 shards per block).
ORDERS = {"global": (), "blocks": ("data.order=blocks", "data.block_shards=4")}


class _Straight(dict):
    """Uninterrupted runs (the session's shared tiny runs), one per backend on 2 processes, and
    ``one_process`` (FSDP2 unwrapped); each trained on first use. ``straight[backend]`` in the global
    order, ``straight[backend, order]`` in either."""

    def __init__(self, tiny_runs) -> None:
        super().__init__()
        self.tiny_runs = tiny_runs

    def __missing__(self, key: str | tuple[str, str]) -> Path:
        backend, order = (key, "global") if isinstance(key, str) else key
        nproc, backend = (1, "fsdp2") if backend == "one_process" else (2, backend)
        run = self.tiny_runs.get(backend, nproc, STEPS, *ORDERS[order])
        if order != "global":  # the order is in use: the first batch is another one
            assert losses_by_step(run)[1] != losses_by_step(self[key[0]])[1], f"{order}: the global order's losses"
        self[key] = run
        return run


@pytest.fixture(scope="module")
def straight(tiny_runs) -> dict[str, Path]:
    return _Straight(tiny_runs)


@pytest.mark.parametrize("backend", [BACKENDS[0], *(pytest.param(b, marks=pytest.mark.slow) for b in BACKENDS[1:])])
def test_exact_resume_after_clean_stop(straight, demo_shards, tmp_path, backend):
    """Halted at step 4 and resumed through the entry point: every step and the final parameters as
    the uninterrupted run's, bit for bit; the checkpoint holds the loader position, each rank's RNG and
    the config; W&B (offline) continues the same run id."""
    wandb = ["logger.wandb.enabled=true", "logger.wandb.mode=offline"]
    first = run_ranks(2, _overrides(demo_shards, tmp_path, backend, "trainer.halt_at_step=4", *wandb), cwd=REPO)
    assert json.loads(first.stdout.strip().splitlines()[-1])["step"] == 4
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step_00000004"
    meta = read_meta(tmp_path / "checkpoints/step_00000004")
    assert meta["samples_consumed"] == 32 and meta["world_size"] == 2 and len(meta["rng"]) == 2
    assert meta["tokens_seen"] == 32 * 64 and meta["config"]["trainer"]["global_batch_size"] == 8
    proc = run_ranks(2, _overrides(demo_shards, tmp_path, backend, *wandb), cwd=REPO)
    assert "resumed from" in proc.stderr and "step 4" in proc.stderr
    assert_bitwise_same(tmp_path, straight[backend])  # fp32 on CPU
    run_id = read_meta(tmp_path / "checkpoints/step_00000008")["callbacks"]["wandb"]["run_id"]
    assert run_id == meta["callbacks"]["wandb"]["run_id"]
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def _crash(demo_shards: Path, run_dir: Path, backend: str, at: str, step: int, rank: int, *extra: str) -> None:
    proc = run_ranks(2, _overrides(demo_shards, run_dir, backend, *extra), script=CRASH_HELPER, check=False,
                     extra_env={"CRASH_AT": at, "CRASH_STEP": str(step), "CRASH_RANK": str(rank)})
    assert proc.returncode != 0, "the run should have died"
    assert "Signal 9 (SIGKILL)" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_resume_after_kill_9_of_a_rank(straight, demo_shards, tmp_path, backend, order):
    _crash(demo_shards, tmp_path, backend, "step", 6, 1, *ORDERS[order])
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step_00000004"
    resumed = run_ranks(2, _overrides(demo_shards, tmp_path, backend, *ORDERS[order]), cwd=REPO)
    assert "resumed from" in resumed.stderr and "step_00000004" in resumed.stderr
    assert_bitwise_same(tmp_path, straight[backend, order])


@pytest.mark.slow
def test_kill_9_during_checkpoint_write_keeps_previous_latest(straight, demo_shards, tmp_path):
    _crash(demo_shards, tmp_path, "fsdp2", "save", 8, 0)
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert (ckpts / ".tmp_step_00000008/state").is_dir() and not (ckpts / "step_00000008").exists()
    resumed = run_ranks(2, _overrides(demo_shards, tmp_path, "fsdp2"), cwd=REPO)
    assert "step_00000004" in resumed.stderr
    assert_bitwise_same(tmp_path, straight["fsdp2"])
    assert (ckpts / "latest").read_text().strip() == "step_00000008"


@pytest.mark.slow
def test_preemption_signal_on_one_rank_stops_all_saves_and_resumes(straight, demo_shards, tmp_path):
    proc = run_ranks(2, _overrides(demo_shards, tmp_path, "fsdp2", "logger.wandb.enabled=true",
                                   "logger.wandb.mode=offline"),
                     script=CRASH_HELPER, exit_status=tmp_path / "exit_status", check=False,
                     extra_env={"CRASH_AT": "signal", "CRASH_STEP": "3", "CRASH_RANK": "1"})
    assert rank_exit_statuses(tmp_path / "exit_status") == {0: 75, 1: 75}, proc.stderr[-3000:]  # the requeue status
    marker = json.loads((tmp_path / "preempted.json").read_text())
    # the signal arrived during step 3 on rank 1 only; both ranks stopped after step 4 at the latest
    assert marker["step"] in (3, 4) and marker["checkpoint"].endswith(f"step_0000000{marker['step']}")
    run_id = read_meta(Path(marker["checkpoint"]))["callbacks"]["wandb"]["run_id"]
    run_ranks(2, _overrides(demo_shards, tmp_path, "fsdp2", "logger.wandb.enabled=true",
                               "logger.wandb.mode=offline"), cwd=REPO)
    assert_bitwise_same(tmp_path, straight["fsdp2"])
    assert not (tmp_path / "preempted.json").exists()
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # same W&B run continued


def test_single_process_sigterm_exits_for_requeue(demo_shards, tmp_path):
    env = _env(CRASH_AT="signal", CRASH_STEP="2", CRASH_RANK="0")
    proc = subprocess.run([sys.executable, str(CRASH_HELPER),
                           *_overrides(demo_shards, tmp_path, "fsdp2")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 75, proc.stderr[-3000:]
    # the signal lands after step 2; the trainer notices it in the next step and stops after step 3
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step_00000003"


def test_a_sigterm_while_exiting_for_requeue_keeps_exit_status_75():
    """After the save, a rank exits 75; a SIGTERM can still come (torchrun sends one to the ranks
    still running when the first exits 75). During interpreter shutdown Python has put back the
    default action, so a handled signal would kill the process (status -15): it must be ignored."""
    code = ("import sys, time\n"
            "from slimpajama_train.preemption import StopRequest\n"
            "from slimpajama_train.train import exit_for_requeue\n"
            "class SlowTeardown:\n"
            "    def __del__(self, sleep=time.sleep):  # runs while the interpreter shuts down (its globals\n"
            "        print('shutting down', flush=True)  # may be gone then), as a rank's teardown does\n"
            "        sleep(2)\n"
            "teardown = SlowTeardown()\n"
            "exit_for_requeue(StopRequest().install())\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "shutting down\n", proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75 and "Exception ignored" not in err, (proc.returncode, err[-2000:])


@pytest.mark.slow
@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_elastic_resume(straight, demo_shards, tmp_path, backend, first, second, order):
    """FSDP2 through DCP resharding; ZeRO through DeepSpeed's universal checkpoint: the resumed run's
    losses, gradient norms (clipped at 1.0 here) and step-8 parameters match the uninterrupted
    2-process run and the one-process run within the equivalence tolerances
    (tests/helpers/equivalence.py), in either sample order. The first leg, where a shared
    uninterrupted run has the same layout, is that run as it stood at step 4 (halted there, it would
    have written the same)."""
    extra = ORDERS[order]
    shared = (straight[backend, order] if first == 2 else straight["one_process", order] if backend == "fsdp2"
              else None)
    if shared is not None:
        halted_copy(shared, tmp_path, 4)
    else:
        run_ranks(first, _overrides(demo_shards, tmp_path, backend, "trainer.halt_at_step=4", *extra), cwd=REPO)
    proc = run_ranks(second, _overrides(demo_shards, tmp_path, backend, *extra), cwd=REPO)
    assert "resumed from" in proc.stderr
    for reference in (backend, "one_process"):
        diff = compare(tmp_path, straight[reference, order])
        print(f"{backend} {first} -> {second} processes, {order} order, against {reference}: {diff}")
        assert diff.steps == STEPS and diff.within_tolerance, (reference, diff)
    got, ref = losses_by_step(tmp_path), losses_by_step(straight[backend, order])
    assert sorted(got) == sorted(ref)
    assert all(abs(got[s][1] - ref[s][1]) < 1e-5 for s in ref if ref[s][1] is not None)  # validation losses


@pytest.mark.slow
def test_resume_from_a_chosen_checkpoint(straight, demo_shards, tmp_path):
    chosen = straight["fsdp2"] / "checkpoints/step_00000004"
    proc = run_ranks(2, _overrides(demo_shards, tmp_path, "fsdp2", f"resume_from={chosen}"), cwd=REPO)
    assert f"resumed from {chosen}" in proc.stderr
    assert_bitwise_same(tmp_path, straight["fsdp2"], after_step=4)


@pytest.mark.slow
def test_async_save_gives_the_same_run_and_blocks_less(straight, demo_shards, tmp_path):
    run_ranks(2, _overrides(demo_shards, tmp_path, "fsdp2", "checkpoint.async_save=true"), cwd=REPO)
    assert_bitwise_same(tmp_path, straight["fsdp2"])
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step_00000008"
    read_meta(tmp_path / "checkpoints/step_00000004")
    blocked = [m["checkpoint_blocking_s"] for m in read_metrics(tmp_path) if "checkpoint_blocking_s" in m]
    sync = [m["checkpoint_blocking_s"] for m in read_metrics(straight["fsdp2"]) if "checkpoint_blocking_s" in m]
    print(f"checkpoint blocking time: async {blocked} s, sync {sync} s")
    assert blocked and sync


def test_corrupt_or_partial_checkpoints_are_reported(straight, tmp_path):
    src = straight["fsdp2"] / "checkpoints/step_00000008"
    for damage, pattern in [("truncate", "has .* bytes"), ("delete", "is missing"), ("meta", "no meta.json")]:
        ckpt = tmp_path / damage
        shutil.copytree(src, ckpt)
        shard = next((ckpt / "state").glob("*.distcp"))
        if damage == "truncate":
            shard.write_bytes(shard.read_bytes()[:100])
        elif damage == "delete":
            shard.unlink()
        else:
            (ckpt / "meta.json").unlink()
        with pytest.raises(CorruptCheckpointError, match=pattern):
            read_meta(ckpt)
    root = tmp_path / "ckpts"
    root.mkdir()
    (root / "latest").write_text("step_00000099\n")
    with pytest.raises(CorruptCheckpointError, match="does not exist"):
        CheckpointStore(CheckpointConfig(), root).latest()


@pytest.mark.slow
def test_trainer_refuses_a_corrupt_checkpoint(straight, demo_shards, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight["fsdp2"] / "checkpoints/step_00000004", ckpt)
    shard = next((ckpt / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(AssertionError) as info:
        run_ranks(2, _overrides(demo_shards, tmp_path / "run", "fsdp2", f"resume_from={ckpt}"), cwd=REPO)
    # One line naming the file (the integrity tests cover each kind of damage), no traceback.
    assert f"slimpajama-train: error: checkpoint.resume={ckpt}: {ckpt}/state/{shard.name} has " in str(info.value)


class _FakeBackend:
    def save(self, path: Path) -> None:
        path.mkdir(parents=True)
        (path / "shard.bin").write_bytes(b"x" * 10)


def test_keep_last_and_keep_every(tmp_path):
    mgr = CheckpointStore(CheckpointConfig(keep_last=2, keep_every=4), tmp_path)
    for step in range(1, 11):
        mgr.save(step, _FakeBackend(), {})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004", "step_00000008", "step_00000009",
                                                               "step_00000010"]
    assert mgr.latest().name == "step_00000010" and read_meta(mgr.latest())["state_files"] == {"shard.bin": 10}


def test_weights_only_loading_refuses_code_in_a_checkpoint(tmp_path):
    import pickle

    from slimpajama_train.safe_load import weights_only_loads

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"w": Exploit()}, fh)
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)  # what DCP and DeepSpeed pass
    assert not (tmp_path / "pwned").exists()


LONG = 24  # steps of the SIGTERM runs: long enough that the signal lands mid-run


@pytest.fixture(scope="module")
def straight_long(demo_shards, tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "straight_long", lambda run_dir: run_ranks(
        2, tiny_train_overrides(demo_shards, run_dir, "checkpoint.interval=10", steps=LONG), cwd=REPO))


def _signal_tree(root: psutil.Process, sig: int) -> list[str]:
    """What SLURM does: the signal to every process of the job (launcher, ranks, loader workers)."""
    procs = [root, *root.children(recursive=True)]
    names = []
    for p in procs:
        try:
            names.append(" ".join(p.cmdline()[:3]))
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return names


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun_forwards", "torchrun_ignores"])
def test_sigterm_to_every_process_saves_exits_75_and_resumes_bitwise(straight_long, demo_shards, tmp_path, launcher):
    """SIGTERM to torchrun, both ranks and their loader workers at once. ``torchrun_forwards``: plain
    torchrun, which also forwards the signal to the ranks and waits up to 30 s; ``torchrun_ignores``:
    as launch/slurm/train.sbatch runs it (TERM ignored by torchrun, handled by the ranks)."""
    import signal as signal_module

    overrides = tiny_train_overrides(demo_shards, tmp_path, "checkpoint.interval=10", steps=LONG)
    status_dir = tmp_path / "exit_status"
    env = launch_env(exit_status=status_dir)
    preexec = None
    if launcher == "torchrun_ignores":
        env["PET_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"  # torchrun's --signals-to-handle
        preexec = lambda: signal_module.signal(signal_module.SIGTERM, signal_module.SIG_IGN)  # noqa: E731
    # Each rank runs under EXIT_STATUS_HELPER, which records its exit status (torchrun, signalled
    # itself, reports none) and passes torchrun's forwarded SIGTERM on to it.
    proc = start_torchrun(2, overrides, env=env, exit_status=status_dir, start_new_session=True, preexec_fn=preexec)
    _wait_for_step(tmp_path, 3, proc)
    root = psutil.Process(proc.pid)
    ranks = [rank for helper in root.children() for rank in helper.children()]
    assert len(ranks) == 2 and all(rank.children() for rank in ranks), \
        "the ranks should have loader workers (data.num_workers=1)"
    signalled = _signal_tree(root, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert "DataLoader worker" not in err, err[-3000:]
    marker = json.loads((tmp_path / "preempted.json").read_text())
    assert 3 <= marker["step"] < LONG, (marker, err[-3000:])
    assert marker["checkpoint"].endswith(f"step_{marker['step']:08d}"), (marker, err[-3000:])
    assert (tmp_path / "checkpoints/latest").read_text().strip() == f"step_{marker['step']:08d}"
    assert rank_exit_statuses(tmp_path / "exit_status") == {0: 75, 1: 75}, err[-3000:]  # every rank
    if launcher == "torchrun_ignores":
        assert proc.returncode == 1 and "exitcode  : 75" in err, err[-3000:]  # torchrun reports the first
    else:
        assert proc.returncode == 1 and "got signal: 15" in err, err[-3000:]  # torchrun raised on its SIGTERM
    assert "exiting for requeue" in err and "after the signal" in err
    print(f"{launcher}: signalled {len(signalled)} processes; stopped and saved at step {marker['step']}")
    resumed = run_ranks(2, overrides, cwd=REPO)
    assert f"step_{marker['step']:08d}" in resumed.stderr
    assert_bitwise_same(tmp_path, straight_long)  # fp32 on CPU


@pytest.mark.slow
def test_signal_during_model_build_is_honoured(straight, demo_shards, tmp_path):
    """SIGTERM while the model is being built (minutes at 7B), on one rank, after resuming from a
    checkpoint: the ranks agree before training anything, save nothing new (nothing changed),
    exit 75 for requeue; the requeued run then finishes with the uninterrupted run's losses."""
    run_ranks(2, _overrides(demo_shards, tmp_path, "fsdp2", "trainer.halt_at_step=4"), cwd=REPO)
    proc = run_ranks(2, _overrides(demo_shards, tmp_path, "fsdp2"), script=CRASH_HELPER,
                     exit_status=tmp_path / "exit_status", check=False,
                     extra_env={"CRASH_AT": "build", "CRASH_STEP": "0", "CRASH_RANK": "1", "CRASH_SIGNAL": "SIGTERM"})
    assert rank_exit_statuses(tmp_path / "exit_status") == {0: 75, 1: 75}, proc.stderr[-3000:]
    marker = json.loads((tmp_path / "preempted.json").read_text())
    assert marker == {"step": 4, "checkpoint": str(tmp_path / "checkpoints/step_00000004")}
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000004"]
    assert max(losses_by_step(tmp_path)) == 4  # no step trained after the signal
    run_ranks(2, _overrides(demo_shards, tmp_path, "fsdp2"), cwd=REPO)
    assert_bitwise_same(tmp_path, straight["fsdp2"])


@pytest.mark.slow
def test_signal_during_build_of_a_fresh_run_exits_without_a_checkpoint(demo_shards, tmp_path):
    env = _env(CRASH_AT="build", CRASH_STEP="0", CRASH_RANK="0", CRASH_SIGNAL="SIGTERM")
    proc = subprocess.run([sys.executable, str(CRASH_HELPER),
                           *_overrides(demo_shards, tmp_path, "fsdp2")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert json.loads((tmp_path / "preempted.json").read_text()) == {"step": 0, "checkpoint": None}
    assert not (tmp_path / "checkpoints").exists()
