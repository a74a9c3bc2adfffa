"""halted_copy: a shared uninterrupted run as it stood at a checkpoint, the first leg of a resume test."""
import json

import pytest

from tests.conftest import halted_copy


def _run(root):
    for step in (4, 8):
        (root / f"checkpoints/step_{step:08d}").mkdir(parents=True)
        (root / f"checkpoints/step_{step:08d}/meta.json").write_text(json.dumps({"step": step}))
    (root / "checkpoints/latest").write_text("step_00000008\n")
    (root / "config.json").write_text("{}")
    records = [{"step": s, "loss": 7.0 - s / 10} for s in range(1, 9)] + [{"step": 4, "val_loss": 6.5}]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_keeps_what_a_run_halted_at_the_step_would_have(tmp_path):
    src = _run(tmp_path / "src")
    dst = halted_copy(src, tmp_path / "dst", 4)
    assert sorted(p.name for p in (dst / "checkpoints").iterdir()) == ["latest", "step_00000004"]
    assert (dst / "checkpoints/latest").read_text() == "step_00000004\n"
    steps = [json.loads(line)["step"] for line in (dst / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4] and (dst / "config.json").read_text() == "{}"
    assert (src / "checkpoints/latest").read_text() == "step_00000008\n"  # the shared run is untouched
    assert len((src / "metrics.jsonl").read_text().splitlines()) == 9


def test_a_step_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 6"):
        halted_copy(_run(tmp_path / "src"), tmp_path / "dst", 6)
