"""2-process torchrun runs of a tiny model: train, checkpoint, stop, resume; then generate and export."""
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, read_metrics
from tests.helpers.launch import run_torchrun

STEPS = 8


def _overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.path={shards}", f"run_dir={run_dir}", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "backend.precision=fp32", "data.micro_batch_size=2", "data.num_workers=1",
        "trainer.global_batch_size=8", f"trainer.max_steps={STEPS}", "trainer.log_interval=1",
        "trainer.eval_interval=4", "trainer.eval_batches=2", "checkpoint.interval=4", "checkpoint.keep_last=3",
        "optim.warmup_steps=2", "optim.lr=3e-3", "logger.wandb.enabled=false", *extra,
    ]


@pytest.fixture(scope="module")
def straight_run(demo_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    proc = run_torchrun(2, _overrides(demo_shards, run_dir), cwd=REPO)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == STEPS and summary["checkpoint"].endswith("step_00000008")
    return run_dir


def _losses(run_dir: Path) -> dict[int, tuple]:
    return {m["step"]: (m.get("loss"), m.get("val_loss")) for m in read_metrics(run_dir)}


def test_stop_and_resume_gives_the_same_per_step_losses(straight_run, demo_shards, tmp_path):
    run_dir = tmp_path / "resumed"
    wandb = ["logger.wandb.enabled=true", "logger.wandb.mode=offline"]
    first = run_torchrun(2, _overrides(demo_shards, run_dir, "trainer.halt_at_step=4", *wandb), cwd=REPO)
    assert json.loads(first.stdout.strip().splitlines()[-1])["step"] == 4
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step_00000004"
    meta = json.loads((run_dir / "checkpoints/step_00000004/meta.json").read_text())
    assert meta["samples_consumed"] == 32 and meta["world_size"] == 2 and len(meta["rng"]) == 2
    assert meta["tokens_seen"] == 32 * 64 and meta["config"]["trainer"]["global_batch_size"] == 8

    second = run_torchrun(2, _overrides(demo_shards, run_dir, *wandb), cwd=REPO)
    assert "resumed from" in second.stderr and "step 4" in second.stderr
    straight, resumed = _losses(straight_run), _losses(run_dir)
    assert sorted(resumed) == sorted(straight) == list(range(STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == straight[step], f"step {step}: {resumed[step]} != {straight[step]}"
    assert straight[STEPS][0] < straight[1][0] and straight[STEPS][1] < straight[0][1]  # it learns
    # W&B (offline) continued the same run id after the resume
    run_id = json.loads((run_dir / "checkpoints/step_00000008/meta.json").read_text())["callbacks"]["wandb"]["run_id"]
    assert run_id == meta["callbacks"]["wandb"]["run_id"]
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_generate_from_checkpoint(straight_run):
    from slimpajama_train.tools.generate import generate_text

    text = generate_text(str(straight_run), "def ", max_new_tokens=20, temperature=0.8, seed=1)
    assert text.startswith("def ") and len(text) > len("def ")
    assert text == generate_text(str(straight_run), "def ", max_new_tokens=20, temperature=0.8, seed=1)


def assert_hf_parity(checkpoint: Path, out_dir: Path) -> None:
    """Export ``checkpoint`` and check transformers' logits (1e-4) and greedy tokens against ours."""
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimpajama_train.tools.export import export_checkpoint
    from slimpajama_train.tools.generate import sample
    from slimpajama_train.tools.load_checkpoint import load_model

    out = export_checkpoint(checkpoint, out_dir)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model",
                                               "tokenizer_config.json"}
    ours, _, _ = load_model(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for prompt in ["def main(argv):\n    return 0", "The license grants permission"]:
        ids = tok(prompt)["input_ids"]
        assert ids == sp.encode(prompt)
        x = torch.tensor([ids])
        with torch.no_grad():
            assert torch.allclose(ours(x), hf(x).logits, atol=1e-4, rtol=0)
        generated = hf.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        greedy_hf = generated[0, len(ids):].tolist()
        assert sample(ours, ids, 12, temperature=0.0) == greedy_hf


def test_export_from_fsdp2_checkpoint_matches_transformers(straight_run, tmp_path):
    assert_hf_parity(straight_run, tmp_path / "hf")


def test_export_from_zero3_checkpoint_matches_transformers(demo_shards, tmp_path):
    run_dir = tmp_path / "z3"
    run_torchrun(2, _overrides(demo_shards, run_dir, "backend=zero3", "trainer.max_steps=3", "trainer.eval_interval=0"),
                 cwd=REPO)
    assert_hf_parity(run_dir, tmp_path / "hf")


def test_single_process_matches_two_processes(straight_run, demo_shards, tmp_path):
    """Same seed, data and global batch on 1 process (4 micro-batches accumulated) as on 2 (2 each)."""
    run_dir = tmp_path / "one"
    run_torchrun(1, _overrides(demo_shards, run_dir, f"trainer.max_steps={STEPS}", "checkpoint.interval=0"), cwd=REPO)
    one, two = _losses(run_dir), _losses(straight_run)
    for step in range(1, STEPS + 1):
        assert one[step][0] == pytest.approx(two[step][0], abs=1e-5), step


def test_bf16_run_trains(demo_shards, tmp_path):
    run_dir = tmp_path / "bf16"
    run_torchrun(1, _overrides(demo_shards, run_dir, "backend.precision=bf16", "trainer.max_steps=4",
                               "checkpoint.interval=0", "trainer.eval_interval=0"), cwd=REPO)
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert len(losses) == 4 and all(loss == loss and loss < 8.0 for loss in losses) and losses[-1] < losses[0]


def test_batch_in_tokens_metrics_and_wandb_naming(demo_shards, tmp_path):
    """global_batch_tokens derives the batch and accumulation; MFU, memory and per-device throughput
    are logged; W&B gets the configured name, tags and config offline."""
    run_dir = tmp_path / "tok"
    proc = run_torchrun(2, _overrides(demo_shards, run_dir, "trainer.global_batch_tokens=1024", "trainer.max_steps=2",
                                      "trainer.peak_tflops=1.0", "logger.wandb.enabled=true",
                                      "logger.wandb.name=unit-run", "logger.wandb.tags=[ci,tiny]",
                                      "logger.wandb.id=fixedid123"), cwd=REPO)
    assert "global batch 16 = 2 micro x 4 accum x 2 ranks" in proc.stderr and "MFLOPs/token" in proc.stderr
    m = [x for x in read_metrics(run_dir) if "loss" in x][-1]
    assert m["tokens_per_s_per_device"] == pytest.approx(m["tokens_per_s"] / 2)
    assert 0 < m["mfu"] < 1 and m["peak_mem_gb"] > 0.1 and m["data_wait_s"] >= 0 and m["skipped_steps"] == 0
    run = next((run_dir / "wandb").glob("offline-run-*-fixedid123"))
    assert run.is_dir()
    with pytest.raises(AssertionError, match="global_batch_tokens=1000 is not a multiple"):
        run_torchrun(1, _overrides(demo_shards, tmp_path / "bad", "trainer.global_batch_tokens=1000"), cwd=REPO)


def test_export_refuses_what_llama_cannot_express():
    from slimpajama_train.model import ModelConfig
    from slimpajama_train.tools.export import hf_config

    for kw, word in [({"position_encoding": "alibi"}, "alibi"), ({"share_layers_every": 2}, "shared"),
                     ({"embedding_rank": 16}, "factorized")]:
        with pytest.raises(ValueError, match=word):
            hf_config(ModelConfig(dim=64, n_layers=2, vocab_size=100, max_seq_len=8, **kw), {"bos_id": 1, "eos_id": 2})


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_model_options_train_on_both_backends(demo_shards, tmp_path, backend):
    run_torchrun(2, _overrides(demo_shards, tmp_path, f"backend={backend}", "backend.precision=fp32",
                               "trainer.max_steps=3", "model.n_layers=4", "model.share_layers_every=2",
                               "model.embedding_rank=16", "model.position_encoding=alibi", "model.tie_embeddings=true",
                               "checkpoint.interval=0", "trainer.eval_interval=0"), cwd=REPO)
    losses = [x["loss"] for x in read_metrics(tmp_path) if "loss" in x]
    assert len(losses) == 3 and losses[-1] < losses[0]
