"""The everyday tools on a real (tiny) run: export writes and never deletes, generate, eval and train
stop with a line a user can act on, and nothing is silently wrong (issue 19).

One 2-step single-process run (no torchrun) is trained for the module, in seconds.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_train_overrides
from tests.helpers.built_once import built_once

STEPS = 2


def _train(*overrides: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``slimpajama-train`` as a plain process: no torchrun and none of its variables."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "HYDRA_FULL_ERROR")}
    return subprocess.run([sys.executable, "-m", "slimpajama_train.train", *overrides], cwd=REPO,
                          env={**base, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(demo_shards, tmp_path_factory) -> tuple[Path, str]:
    """A run whose warm-up (2 steps) is as long as the run (2 steps): it warns, and still trains.
    The run folder and the trainer's stderr."""

    def train(folder: Path) -> None:
        proc = _train(*tiny_train_overrides(demo_shards, folder / "run", "trainer.eval_interval=0",
                                            "data.num_workers=0", f"checkpoint.interval={STEPS}", steps=STEPS))
        assert proc.returncode == 0, proc.stderr[-4000:]
        (folder / "stderr.txt").write_text(proc.stderr)

    folder = built_once(tmp_path_factory, "tools_run", train)
    return folder / "run", (folder / "stderr.txt").read_text()


@pytest.fixture
def checkpoint(tiny_run) -> Path:
    return tiny_run[0] / "checkpoints" / f"step_{STEPS:08d}"


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- export: writes, never deletes ----------------------------------------------------------------
def test_export_refuses_a_folder_with_files_and_force_replaces_only_its_own(checkpoint, tmp_path):
    from slimpajama_train.tools.export import export_checkpoint

    out = tmp_path / "v"
    (out / "other").mkdir(parents=True)
    (out / "other" / "w.bin").write_bytes(b"x")
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")  # a file an export writes: only --force replaces it
    with pytest.raises(FileExistsError, match=f"{out}: not empty.*--force"):
        export_checkpoint(checkpoint, out)
    assert _tree(out) == {"other/w.bin": b"x", "notes.txt": b"mine", "config.json": b"{}"}

    export_checkpoint(checkpoint, out, force=True)
    tree = _tree(out)
    assert tree["other/w.bin"] == b"x" and tree["notes.txt"] == b"mine"
    assert json.loads(tree["config.json"])["architectures"] == ["LlamaForCausalLM"]
    assert {"model.safetensors", "tokenizer.model", "tokenizer.json", "generation_config.json"} <= set(tree)
    assert not [p for p in out.iterdir() if p.name.startswith(".export-")]  # no staging left behind


def test_export_refuses_the_run_folder_even_with_force(tiny_run, checkpoint):
    from slimpajama_train.tools.export import export_checkpoint

    run_dir = tiny_run[0]
    before = _tree(run_dir)
    for out in (run_dir, run_dir / "checkpoints", checkpoint / "hf"):
        for force in (False, True):
            with pytest.raises(ValueError, match="run folder or inside the checkpoints"):
                export_checkpoint(checkpoint, out, force=force)
    assert _tree(run_dir) == before  # the checkpoints, config.json and metrics all survive
    assert export_checkpoint(checkpoint, run_dir / "hf") == run_dir / "hf"  # a folder of its own in the run is fine


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_exported_files_follow_the_umask(checkpoint, tmp_path, umask):
    from slimpajama_train.tools.export import export_checkpoint

    old = os.umask(umask)
    try:
        out = export_checkpoint(checkpoint, tmp_path / "hf")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}


def test_export_cli_error_is_one_line_and_debug_shows_the_traceback(checkpoint, tmp_path, capsys):
    from slimpajama_train.tools.export import main

    out = tmp_path / "busy"
    out.mkdir()
    (out / "w.bin").write_bytes(b"x")
    with pytest.raises(SystemExit) as info:
        main([str(checkpoint), str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1 and len(err) == 2, err
    assert err[0].startswith(f"slimpajama-export: error: {out}: not empty") and "--force" in err[0]
    assert "--debug" in err[1]
    with pytest.raises(FileExistsError):
        main([str(checkpoint), str(out), "--debug"])


# ---- generate ---------------------------------------------------------------------------------------
def test_generate_with_an_empty_prompt_starts_a_document_after_eos(tiny_run, monkeypatch):
    import sentencepiece as spm

    from slimpajama_train.tools import generate

    contexts = []
    real = generate.sample
    monkeypatch.setattr(generate, "sample", lambda model, tokens, *a, **k: contexts.append(tokens) or real(
        model, tokens, *a, **k))
    text = generate.generate_text(str(tiny_run[0]), "", max_new_tokens=4, seed=0)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_run[0] / "checkpoints" / f"step_{STEPS:08d}" /
                                               "tokenizer.model"))
    assert contexts == [[sp.eos_id()]] and isinstance(text, str)


def test_generate_names_a_path_that_does_not_exist(tmp_path, capsys):
    from slimpajama_train.tools.generate import main

    missing = tmp_path / "runs" / "no_such_run"
    with pytest.raises(SystemExit) as info:
        main([str(missing)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1 and len(err) == 2, err
    assert err[0] == (f"slimpajama-generate: error: {missing}: no such file or folder; give a checkpoint "
                      "(…/checkpoints/step_XXXXXXXX), its checkpoints/ folder or the run folder")


# ---- train: config errors, warnings, launch ------------------------------------------------------------
@pytest.mark.parametrize("override, expected", [
    ("trainer.max_stepz=3", "trainer.max_stepz: no such key; did you mean trainer.max_steps?"),
    ("optim.lr=-1", "optim.lr=-1.0: must be > 0"),
    ("trainer.max_steps=abc", "trainer.max_steps: Value 'abc' of type 'str' could not be converted to Integer"),
    ("model=nosuch", "model=nosuch: no such option; choose one of"),
])
def test_train_config_error_is_two_lines_naming_the_key(override, expected):
    proc = _train(override)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 2, proc.stderr
    assert lines[0].startswith(f"slimpajama-train: config error: {expected}"), lines
    assert lines[1] == "(set HYDRA_FULL_ERROR=1 for the traceback)"
    assert "Traceback" not in proc.stderr and not proc.stdout


def test_train_config_error_traceback_with_hydra_full_error():
    proc = _train("optim.lr=-1", env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "ValueError: optim.lr=-1.0: must be > 0" in proc.stderr


def test_warmup_as_long_as_the_run_warns(tiny_run):
    warning = [line for line in tiny_run[1].splitlines() if line.startswith("warning: optim.warmup_steps")]
    assert warning == [f"warning: optim.warmup_steps=2 >= trainer.max_steps={STEPS}: the whole run is warm-up (the "
                       "learning rate rises to 0.003 of optim.lr=0.003 at the last step and never decays); set "
                       "optim.warmup_steps below trainer.max_steps (often 1-10% of it)"], tiny_run[1][-2000:]


def test_schedule_warning_only_for_a_warmup_at_least_the_run():
    from slimpajama_train.optim import OptimConfig, schedule_warning

    assert schedule_warning(OptimConfig(warmup_steps=99), 100) is None
    assert "rises to 0.00015 of optim.lr=0.0003" in schedule_warning(OptimConfig(warmup_steps=200, lr=3e-4), 100)


def test_zero2_runs_as_a_single_process_without_torchrun(demo_shards, tmp_path):
    """DeepSpeed asserted LOCAL_RANK (set by launchers); our group of one tells it the local rank."""
    proc = _train(*tiny_train_overrides(demo_shards, tmp_path / "z2", "trainer.eval_interval=0",
                                        "data.num_workers=0", "checkpoint.interval=0", backend="zero2", steps=2))
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["last_train_loss"] > 0


# ---- eval ---------------------------------------------------------------------------------------------
@pytest.fixture
def exported(checkpoint, tmp_path) -> Path:
    from slimpajama_train.tools.export import export_checkpoint

    return export_checkpoint(checkpoint, tmp_path / "hf")


def test_eval_names_metrics_by_split_and_shows_progress(exported, demo_shards, capsys):
    """An export (whose tokenizer matches the shards') scored on the train split: eval/train_*, and
    progress lines on a stream that is not a terminal."""
    from slimpajama_train.tools.evaluate import main

    main([str(exported), "--data", str(demo_shards), "--split", "train", "--max-batches", "3", "--batch-size", "2",
          "--device", "cpu"])
    out, err = capsys.readouterr()
    metrics = json.loads(out)
    assert {"eval/train_loss", "eval/train_ppl", "eval/train_tokens"} <= set(metrics)
    assert not [k for k in metrics if k.startswith("eval/val")]
    progress = [line for line in err.splitlines() if line.startswith("perplexity train: ")]
    assert [line.split(",")[0] for line in progress] == [f"perplexity train: {b}/3 batches" for b in (1, 2, 3)]
    assert progress[-1].split(", ")[1] == "6 samples"


def test_eval_refuses_max_batches_0(tiny_run, demo_shards, capsys):
    from slimpajama_train.tools.evaluate import main

    with pytest.raises(SystemExit) as info:  # it printed NaN metrics
        main([str(tiny_run[0]), "--data", str(demo_shards), "--max-batches", "0", "--device", "cpu"])
    assert info.value.code == 2
    assert "--max-batches=0: must be >= 1 (omit it to score the whole split)" in capsys.readouterr().err


def test_eval_refuses_an_export_whose_tokenizer_differs_from_the_shards(exported, demo_shards, tmp_path, capsys):
    from data_prep.tokenizer import file_sha256
    from slimpajama_train.tools.evaluate import main

    other = tmp_path / "other_shards"
    other.mkdir()
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "ab" * 32  # shards of another tokenizer
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as info:
        main([str(exported), "--data", str(other), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    ours = file_sha256(exported / "tokenizer.model")
    assert info.value.code == 1 and err[0] == (
        f"slimpajama-eval: error: {other}/manifest.json: shards were tokenized with tokenizer sha256 abababababab…, "
        f"the model with {ours[:12]}…; score shards prepared with the model's tokenizer"), err

    (exported / "tokenizer.model").unlink()  # nothing says which tokenizer the model has: refused too
    with pytest.raises(SystemExit):
        main([str(exported), "--data", str(demo_shards), "--device", "cpu"])
    assert "no tokenizer.model and no recorded tokenizer checksum" in capsys.readouterr().err


def test_eval_progress_is_a_bar_on_a_terminal():
    import io

    from slimpajama_train.tools.evaluate import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    p = Progress("perplexity val", 4, term)
    for b in range(1, 5):
        p.update(b, 2 * b, 3.0)
    p.close()
    assert "perplexity val: 100%" in term.getvalue() and "4/4" in term.getvalue()
    assert "batches, " not in term.getvalue()  # no log lines on a terminal: the bar only
