"""2-process torchrun runs of a tiny model: train, checkpoint, stop, resume; then generate and export."""
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, read_metrics
from tests.helpers.launch import run_ranks

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
def straight_run(tiny_runs) -> Path:
    """The session's shared 8-step FSDP2 run on 2 processes (checkpoints at 4 and 8); read-only."""
    run_dir = tiny_runs.get("fsdp2")
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step_00000008"
    return run_dir


# Stop and resume through the entry point, with the meta.json fields and W&B's continued run id, is
# tests/slimpajama_train/test_resume.py::test_exact_resume_after_clean_stop[fsdp2] (bitwise, stricter
# than the per-step losses this module compared); one process against two is
# test_backends.py::test_every_layout_trains_as_one_process (losses, gradient norms and parameters).


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


@pytest.mark.slow
def test_export_from_zero3_checkpoint_matches_transformers(demo_shards, tmp_path):
    run_dir = tmp_path / "z3"
    run_ranks(2, _overrides(demo_shards, run_dir, "backend=zero3", "trainer.max_steps=3", "trainer.eval_interval=0"),
                 cwd=REPO)
    assert_hf_parity(run_dir, tmp_path / "hf")


@pytest.mark.slow
def test_bf16_run_trains(demo_shards, tmp_path):
    run_dir = tmp_path / "bf16"
    run_ranks(1, _overrides(demo_shards, run_dir, "backend.precision=bf16", "trainer.max_steps=4",
                               "checkpoint.interval=0", "trainer.eval_interval=0"), cwd=REPO)
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert len(losses) == 4 and all(loss == loss and loss < 8.0 for loss in losses) and losses[-1] < losses[0]


@pytest.mark.slow
def test_batch_in_tokens_metrics_and_wandb_naming(demo_shards, tmp_path):
    """global_batch_tokens derives the batch and accumulation; MFU, memory and per-device throughput
    are logged; W&B gets the configured name, tags and config offline."""
    run_dir = tmp_path / "tok"
    proc = run_ranks(2, _overrides(demo_shards, run_dir, "trainer.global_batch_tokens=1024", "trainer.max_steps=2",
                                      "trainer.peak_tflops=1.0", "logger.wandb.enabled=true",
                                      "logger.wandb.name=unit-run", "logger.wandb.tags=[ci,tiny]",
                                      "logger.wandb.id=fixedid123"), cwd=REPO)
    assert "global batch 16 = 2 micro x 4 accum x 2 ranks" in proc.stderr and "MFLOPs/token" in proc.stderr
    m = [x for x in read_metrics(run_dir) if "loss" in x][-1]
    assert m["tokens_per_s_per_device"] == pytest.approx(m["tokens_per_s"] / 2)
    assert 0 < m["mfu"] < 1 and m["peak_mem_gb"] > 0.1 and m["data_wait_s"] >= 0 and m["skipped_steps"] == 0
    run = next((run_dir / "wandb").glob("offline-run-*-fixedid123"))
    assert run.is_dir()


def test_batch_in_tokens_must_be_a_multiple_of_the_sequence_length():
    from slimpajama_train.config import TrainConfig, TrainerConfig, resolve_config

    manifest = {"seq_len": 64, "tokenizer": {"vocab_size": 1000}}
    with pytest.raises(ValueError, match="global_batch_tokens=1000 is not a multiple"):
        resolve_config(TrainConfig(trainer=TrainerConfig(global_batch_tokens=1000)), manifest, 1)


def test_export_refuses_what_llama_cannot_express():
    from slimpajama_train.model import ModelConfig
    from slimpajama_train.tools.export import hf_config

    for kw, word in [({"position_encoding": "alibi"}, "alibi"), ({"share_layers_every": 2}, "shared"),
                     ({"embedding_rank": 16}, "factorized")]:
        with pytest.raises(ValueError, match=word):
            hf_config(ModelConfig(dim=64, n_layers=2, vocab_size=100, max_seq_len=8, **kw), {"bos_id": 1, "eos_id": 2})


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_model_options_train_on_both_backends(demo_shards, tmp_path, backend):
    run_ranks(2, _overrides(demo_shards, tmp_path, f"backend={backend}", "backend.precision=fp32",
                               "trainer.max_steps=3", "model.n_layers=4", "model.share_layers_every=2",
                               "model.embedding_rank=16", "model.position_encoding=alibi", "model.tie_embeddings=true",
                               "checkpoint.interval=0", "trainer.eval_interval=0"), cwd=REPO)
    losses = [x["loss"] for x in read_metrics(tmp_path) if "loss" in x]
    assert len(losses) == 3 and losses[-1] < losses[0]
