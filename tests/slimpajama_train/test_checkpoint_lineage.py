"""Checkpoint lineage: ordered by step, a fresh start never overwrites or prunes an earlier run's
checkpoints unless told, and after any sequence of fresh starts, resumes, halts, prunes and
corruptions ``latest`` names a checkpoint that loads (random sequences over a fake backend)."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from slimpajama_train.checkpoint import (
    ON_EXISTING,
    CheckpointConfig,
    CheckpointStore,
    CorruptCheckpointError,
    checkpoint_step,
    list_checkpoints,
    read_meta,
)
from tests.conftest import REPO, tiny_train_overrides


class FakeBackend:
    """Writes DCP-like files whose contents name the step; ``load`` reads it back."""

    model = None

    def __init__(self) -> None:
        self.step = 0
        self.loaded: int | None = None

    def save(self, path: Path) -> None:
        path.mkdir(parents=True)
        (path / ".metadata").write_text(json.dumps({"step": self.step}))
        (path / "__0_0.distcp").write_bytes(self.step.to_bytes(8, "little") * 64)

    def load(self, path: Path) -> None:
        step = json.loads((path / ".metadata").read_text())["step"]
        assert (path / "__0_0.distcp").read_bytes() == step.to_bytes(8, "little") * 64
        self.loaded = step


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _verified(root: Path) -> list[int]:
    return [checkpoint_step(p) for p in list_checkpoints(root) if read_meta(p).get("verified")]


def test_pruning_orders_by_step_not_by_name(tmp_path):
    """step_100000000 sorts before step_99999999 by name: it must still count as the newest."""
    mgr = CheckpointStore(CheckpointConfig(keep_last=1), tmp_path)
    backend = FakeBackend()
    for step in (99_999_999, 100_000_000):
        backend.step = step
        mgr.save(step, backend, {})
    assert mgr.latest().name == "step_100000000"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_100000000"]


def test_fresh_start_in_a_used_directory_is_refused_archived_or_overwritten(tmp_path):
    """The reproduced loss: an older run has steps 4 and 8; a fresh start would save step 4 over the
    old one and, pruning by name, delete its own new checkpoints."""
    backend = FakeBackend()
    old = CheckpointStore(CheckpointConfig(keep_last=2), tmp_path)
    for step in (4, 8):
        backend.step = step
        old.save(step, backend, {})
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"step_00000004\.\.step_00000008 \(2\) that a fresh start would "
                                              r"overwrite; set checkpoint.on_existing=archive"):
        CheckpointStore(CheckpointConfig(resume="none"), tmp_path).start()
    assert _snapshot(tmp_path) == before  # nothing touched
    (tmp_path / "latest").unlink()  # resume=auto without `latest`: the newest intact checkpoint, not a fresh start
    assert CheckpointStore(CheckpointConfig(), tmp_path).start().name == "step_00000008"
    assert (tmp_path / "latest").read_text().strip() == "step_00000008"
    mgr = CheckpointStore(CheckpointConfig(resume="none", on_existing="archive"), tmp_path)
    assert mgr.start() is None
    (archive,) = tmp_path.glob("archive_*")
    assert _snapshot(archive) == before  # moved, byte for byte, with its `latest`
    backend.step = 4
    mgr.save(4, backend, {})
    assert mgr.latest().name == "step_00000004" and _snapshot(archive) == before
    mgr = CheckpointStore(CheckpointConfig(resume="none", on_existing="overwrite"), tmp_path)
    assert mgr.start() is None and list_checkpoints(tmp_path) == [] and not (tmp_path / "latest").exists()
    assert _snapshot(archive) == before  # only checkpoints of this directory's lineage are deleted


def test_resume_from_an_older_checkpoint_does_not_overwrite_newer_ones(tmp_path):
    backend = FakeBackend()
    mgr = CheckpointStore(CheckpointConfig(keep_last=0), tmp_path)
    for step in (4, 8, 12):
        backend.step = step
        mgr.save(step, backend, {})
    older = tmp_path / "step_00000004"
    with pytest.raises(FileExistsError, match=r"step_00000008\.\.step_00000012 \(2\) that resuming"):
        CheckpointStore(CheckpointConfig(resume=str(older)), tmp_path).start()
    mgr = CheckpointStore(CheckpointConfig(resume=str(older), on_existing="archive"), tmp_path)
    assert mgr.start() == older and (tmp_path / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in next(tmp_path.glob("archive_*")).iterdir()) == ["step_00000008", "step_00000012"]


def test_newest_verified_checkpoint_survives_pruning(tmp_path):
    """Checkpoints saved with a non-finite loss are not verified: with keep_last=1 they do not push
    out the last verified one until a newer verified checkpoint exists."""
    mgr = CheckpointStore(CheckpointConfig(keep_last=1), tmp_path)
    backend = FakeBackend()
    for step, finite in [(4, True), (8, False), (12, False), (16, True)]:
        backend.step = step
        mgr.save(step, backend, {"loss_finite": finite})
        names = [p.name for p in list_checkpoints(tmp_path)]
        assert names == (["step_00000016"] if step == 16 else ["step_00000004", f"step_{step:08d}"][-1 - (step > 4):])


@pytest.mark.parametrize("seed", range(25))
def test_latest_always_loads_over_random_sequences(tmp_path, seed):
    rng = random.Random(seed)
    root = tmp_path / "ckpts"
    backend = FakeBackend()
    base = rng.choice([0, 99_999_990])  # steps that cross 10**8 change the names' length
    step: int | None = None
    mgr: CheckpointStore | None = None
    corrupted: set[str] = set()
    archived: dict[Path, dict[str, bytes]] = {}
    for _ in range(40):
        op = rng.choice(["fresh", "resume", "train", "train", "train", "halt", "corrupt", "drop_latest"])
        cfg = dict(keep_last=rng.randint(1, 3), keep_every=rng.choice([0, 0, 8]))
        if op == "fresh":
            existing, before = list_checkpoints(root), _snapshot(root) if root.exists() else {}
            policy = rng.choice(ON_EXISTING)
            mgr = CheckpointStore(CheckpointConfig(resume="none", on_existing=policy, **cfg), root,
                                    log=lambda m: None)
            if policy == "refuse" and existing:
                with pytest.raises(FileExistsError):
                    mgr.start()
                assert _snapshot(root) == before
                step, mgr = None, None
                continue
            assert mgr.start() is None and list_checkpoints(root) == []
            if existing and policy == "archive":
                new = [a for a in root.glob("archive_*") if a not in archived]
                assert len(new) == 1
                archived[new[0]] = _snapshot(new[0])
                assert {k for k in before if k.split("/")[0] in {p.name for p in existing}} <= set(
                    archived[new[0]])
            corrupted.clear()
            step = base
        elif op == "resume":
            mgr = CheckpointStore(CheckpointConfig(resume="auto", on_existing="refuse", **cfg), root,
                                    log=lambda m: None)
            try:
                path = mgr.start()
            except CorruptCheckpointError:
                assert all(p.name in corrupted for p in list_checkpoints(root))
                step, mgr = None, None
                continue
            if path is None:
                assert list_checkpoints(root) == []
                step = base
            else:
                meta = mgr.load(path, backend)
                assert backend.loaded == meta["step"] == checkpoint_step(path) and path.name not in corrupted
                step = meta["step"]
        elif op == "train" and mgr is not None and step is not None:
            for _ in range(rng.randint(1, 7)):
                step += 1
                if rng.random() < 0.4:
                    protected = max(_verified(root), default=None)
                    backend.step = step
                    mgr.save(step, backend, {"loss_finite": rng.random() > 0.3})
                    newest_verified = max(_verified(root), default=None)
                    assert protected is None or (root / f"step_{protected:08d}").is_dir() or (
                        newest_verified is not None and newest_verified > protected)
        elif op == "halt":
            step, mgr = None, None
        elif op == "corrupt" and list_checkpoints(root):
            victim = rng.choice(list_checkpoints(root))
            shard = victim / "state/__0_0.distcp"
            data = bytearray(shard.read_bytes())
            data[rng.randrange(len(data))] ^= 0x5A
            shard.write_bytes(bytes(data))
            corrupted.add(victim.name)
        elif op == "drop_latest" and (root / "latest").exists():
            (root / "latest").unlink()  # what a user does to start over
        # The invariant: whenever `latest` exists it names the newest checkpoint, and it loads unless it
        # was corrupted after it was written (the next resume then falls back past it).
        for archive, files in archived.items():
            assert _snapshot(archive) == files  # nothing archived is ever touched again
        if (root / "latest").exists():
            latest = CheckpointStore(CheckpointConfig(), root).latest()
            assert latest == list_checkpoints(root)[-1]
            if latest.name not in corrupted:
                assert CheckpointStore(CheckpointConfig(), root).verify(latest) == []
                CheckpointStore(CheckpointConfig(), root).load(latest, FakeBackend())


@pytest.mark.slow
def test_trainer_refuses_a_fresh_start_in_a_used_run_dir(demo_shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def train(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "slimpajama_train.train",
                               *tiny_train_overrides(demo_shards, tmp_path, *extra, steps=4)],
                              cwd=REPO, capture_output=True, text=True, timeout=600, env=env)

    assert train().returncode == 0
    ckpts = tmp_path / "checkpoints"
    before = _snapshot(ckpts)
    refused = train("checkpoint.resume=none")
    assert refused.returncode != 0
    last = [line for line in refused.stderr.splitlines() if line.startswith("slimpajama-train: error: ")][-1]
    assert "Traceback" not in refused.stderr  # one line and the HYDRA_FULL_ERROR hint
    assert f"{ckpts} holds checkpoints step_00000004 that a fresh start would overwrite" in last, last
    assert "checkpoint.on_existing=archive" in last and "=overwrite" in last
    assert _snapshot(ckpts) == before
    archived = train("checkpoint.resume=none", "checkpoint.on_existing=archive")
    assert archived.returncode == 0, archived.stderr[-3000:]
    (archive,) = ckpts.glob("archive_*")
    assert _snapshot(archive) == before
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert CheckpointStore(CheckpointConfig(), ckpts).verify(ckpts / "step_00000004") == []
