"""Checkpoint integrity: per-file sha256 recorded at save and checked on resume (FSDP2 and ZeRO-2), the
fallback to the newest intact checkpoint, a suspect checkpoint (non-finite losses after resume), a
full disk during a save, and the resume checks (model shape, dataset, LR schedule)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slimpajama_train.checkpoint import CheckpointConfig, CheckpointStore, read_meta
from tests.conftest import REPO, losses_by_step, tiny_train_overrides
from tests.helpers.launch import run_ranks

pytestmark = pytest.mark.slow  # every test here: `make test-fast` leaves the module out

HELPER = REPO / "tests/helpers/checkpoint_fault_helper.py"
BACKENDS = ["fsdp2", "zero2"]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), **extra}


def _error_line(stderr: str) -> str:
    """The message that ended the run: one line after ``slimpajama-train: error:``, then the hint, and
    no traceback (``HYDRA_FULL_ERROR=1`` would show it)."""
    lines = stderr.splitlines()
    k = max(i for i, line in enumerate(lines) if line.startswith("slimpajama-train: error: "))
    assert lines[k + 1] == "(set HYDRA_FULL_ERROR=1 for the traceback)" and "Traceback" not in stderr, stderr[-3000:]
    return lines[k].removeprefix("slimpajama-train: error: ")


@pytest.fixture(scope="module")
def runs(tiny_runs) -> dict[str, Path]:
    """8 steps on 2 ranks, checkpoints at steps 4 and 8, one run per backend (the session's shared
    tiny runs: read-only here, copied where a test damages them)."""
    return {backend: tiny_runs.get(backend) for backend in BACKENDS}


def _flip(path: Path, n: int = 4096) -> None:
    """Overwrite up to ``n`` bytes in the middle of a file with different bytes: the size is unchanged."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - n // 2)
    for i in range(start, min(len(data), start + n)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _shard(ckpt: Path, backend: str) -> Path:
    """A per-rank shard of rank 1 (DCP's file, or DeepSpeed's partitioned optimizer state)."""
    pattern = "__1_0.distcp" if backend == "fsdp2" else "ds/*zero_pp_rank_1_*optim_states.pt"
    return next((ckpt / "state").glob(pattern))


def _metadata(ckpt: Path, backend: str) -> Path:
    """The file every rank reads first: DCP's .metadata, DeepSpeed's model states."""
    return ckpt / "state" / (".metadata" if backend == "fsdp2" else "ds/mp_rank_00_model_states.pt")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "metadata"])
def test_damaged_file_is_found_and_named(runs, tmp_path, backend, damage):
    ckpt = tmp_path / "step_00000008"
    shutil.copytree(runs[backend] / "checkpoints/step_00000008", ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["checksum"] == "sha256" and meta["verified"] is True
    assert sorted(meta["files"]) == sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*")
                                           if p.is_file() and p.name != "meta.json")
    target = _metadata(ckpt, backend) if damage == "metadata" else _shard(ckpt, backend)
    if damage in ("flip", "metadata"):
        _flip(target)
        expect = "differs from the one recorded at save"
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
        expect = "bytes, meta.json says"
    else:
        target.unlink()
        expect = "is missing"
    problems = CheckpointStore(CheckpointConfig(), tmp_path).verify(ckpt)
    assert len(problems) == 1 and str(target) in problems[0] and expect in problems[0], problems


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_falls_back_to_the_newest_intact_checkpoint(runs, demo_shards, tmp_path, backend):
    """The newest checkpoint (step 8) has 4 KB overwritten: resume=auto loads step 4 instead, says
    which steps are lost, keeps the corrupt one aside, trains 5-8 again to the same losses."""
    shutil.copytree(runs[backend], tmp_path, dirs_exist_ok=True)
    (tmp_path / "metrics.jsonl").unlink()
    shard = _shard(tmp_path / "checkpoints/step_00000008", backend)
    _flip(shard)
    proc = run_ranks(2, tiny_train_overrides(demo_shards, tmp_path, backend=backend), cwd=REPO)
    assert f"step_00000008 is corrupt, not loaded: {shard}: sha256 differs" in proc.stderr, proc.stderr[-3000:]
    assert "falling back to step_00000004; steps 5-8 are lost" in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints/corrupt/step_00000008/meta.json").is_file()  # kept, not deleted
    assert losses_by_step(tmp_path) == {s: v for s, v in losses_by_step(runs[backend]).items() if s > 4}
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000008"
    assert CheckpointStore(CheckpointConfig(), ckpts).verify(ckpts / "step_00000008") == []


def test_non_finite_losses_after_resume_stop_the_run_and_prune_nothing(runs, demo_shards, tmp_path):
    """Every step after the resume has a NaN loss (as from corrupt weights): the run stops at its first
    checkpoint with a message that the checkpoint is suspect, exits non-zero, saves and prunes nothing
    (keep_last=1 would otherwise delete step 4 and 8 once steps 10 and 12 are saved)."""
    shutil.copytree(runs["fsdp2"] / "checkpoints", tmp_path / "checkpoints")
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    overrides = tiny_train_overrides(demo_shards, tmp_path, "checkpoint.interval=2", "checkpoint.keep_last=1",
                                     steps=12)
    proc = subprocess.run([sys.executable, str(HELPER), *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=_env(FAULT="nan_loss"))
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "every step since resuming from" in proc.stderr and "that checkpoint is suspect" in proc.stderr
    last = _error_line(proc.stderr)
    assert "that checkpoint is suspect" in last and "resume_from=" in last and "step_00000004" in last, last
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step_00000008"


def test_disk_full_during_a_save_names_path_and_bytes_and_keeps_the_previous(demo_shards, tmp_path):
    """ENOSPC inside the backend's write of step 8 (after a partial file): one message with the path
    and the bytes needed; no temporary directory left; step 4 and ``latest`` intact."""
    proc = subprocess.run([sys.executable, str(HELPER), *tiny_train_overrides(demo_shards, tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=_env(FAULT="enospc", FAULT_STEP="8"))
    assert proc.returncode != 0
    last = _error_line(proc.stderr)
    ckpts = tmp_path / "checkpoints"
    assert f"disk full writing {ckpts / '.tmp_step_00000008'}" in last and " bytes)" in last, last
    assert f"{ckpts / 'step_00000004'} is kept as latest" in last, last
    needed = sum(p.stat().st_size for p in (ckpts / "step_00000004").rglob("*") if p.is_file())
    assert f"{needed} bytes" in last
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000004"]
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert CheckpointStore(CheckpointConfig(), ckpts).verify(ckpts / "step_00000004") == []


def _train(overrides: list[str], **env) -> subprocess.CompletedProcess:
    """One process, no torchrun (FSDP2 reshards the 2-rank checkpoint to 1 rank)."""
    return subprocess.run([sys.executable, "-m", "slimpajama_train.train", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=_env(**env))


def test_model_shape_change_on_resume_is_one_message(runs, demo_shards, tmp_path):
    ckpt = runs["fsdp2"] / "checkpoints/step_00000004"
    proc = _train(tiny_train_overrides(demo_shards, tmp_path, f"resume_from={ckpt}", "model.dim=128",
                                       "model.n_layers=3"))
    assert proc.returncode != 0
    last = _error_line(proc.stderr)
    assert f"{ckpt} was trained with" in last, proc.stderr[-3000:]
    assert "model.dim=64 (now 128)" in last and "model.n_layers=2 (now 3)" in last
    assert "checkpoint.resume=none" in last and "new run_dir" in last
    assert "size mismatch" not in proc.stderr  # refused before any tensor is read


def test_resume_onto_another_dataset_is_refused_unless_allowed(runs, demo_shards, tmp_path):
    other = tmp_path / "other_shards"
    shutil.copytree(demo_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["prep_config_hash"] = "0123456789abcdef"
    (other / "manifest.json").write_text(json.dumps(manifest))
    ckpt = runs["fsdp2"] / "checkpoints/step_00000004"
    old_hash = read_meta(ckpt)["data_manifest_hash"]
    proc = _train(tiny_train_overrides(other, tmp_path / "run", f"resume_from={ckpt}"))
    assert proc.returncode != 0
    last = _error_line(proc.stderr)
    assert f"trained on data {old_hash} ({demo_shards})" in last, proc.stderr[-3000:]
    assert f"data.path={other} is 0123456789abcdef" in last and "data.allow_change=true" in last
    proc = _train(tiny_train_overrides(other, tmp_path / "run", f"resume_from={ckpt}", "data.allow_change=true",
                                       "trainer.halt_at_step=5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: " in proc.stderr and "0123456789abcdef (data.allow_change=true)" in proc.stderr


def test_resume_that_changes_the_sample_order_is_refused_unless_allowed(runs, demo_shards, tmp_path):
    """samples_consumed names positions of the order: resumed in another order (data.order,
    data.block_shards, data.seed), the rest of the epoch would read some samples twice and others
    never. Refused, naming both orders and the way out; with data.allow_change a warning."""
    ckpt = runs["fsdp2"] / "checkpoints/step_00000004"
    blocks = ["data.order=blocks", "data.block_shards=2"]
    proc = _train(tiny_train_overrides(demo_shards, tmp_path / "run", f"resume_from={ckpt}", *blocks))
    assert proc.returncode != 0
    last = _error_line(proc.stderr)
    assert "data.seed/order/block_shards=1234/global/None, now 1234/blocks/2" in last, proc.stderr[-3000:]
    assert "data.allow_change=true" in last
    proc = _train(tiny_train_overrides(demo_shards, tmp_path / "seed", f"resume_from={ckpt}", "data.seed=7"))
    assert proc.returncode != 0 and "now 7/global/None" in _error_line(proc.stderr), proc.stderr[-3000:]
    proc = _train(tiny_train_overrides(demo_shards, tmp_path / "run", f"resume_from={ckpt}", *blocks,
                                       "data.allow_change=true", "trainer.halt_at_step=5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: " in proc.stderr and "now 1234/blocks/2" in proc.stderr


def test_resume_that_changes_the_lr_schedule_warns(runs, demo_shards, tmp_path):
    ckpt = runs["fsdp2"] / "checkpoints/step_00000004"
    proc = _train(tiny_train_overrides(demo_shards, tmp_path, f"resume_from={ckpt}", "trainer.halt_at_step=5",
                                       "optim.lr=1e-3", steps=16))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stderr.splitlines() if "changes the LR schedule" in line)
    assert "trainer.max_steps 8 -> 16" in line and "optim.lr 0.003 -> 0.001" in line and "step 5" in line
    same = _train(tiny_train_overrides(demo_shards, tmp_path / "same", f"resume_from={ckpt}",
                                       "trainer.halt_at_step=5"))
    assert same.returncode == 0 and "changes the LR schedule" not in same.stderr
