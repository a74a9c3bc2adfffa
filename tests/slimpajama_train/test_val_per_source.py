"""Per-domain validation: a run whose holdout has three sources reports loss, perplexity and tokens
per source at every evaluation, each equal to a direct computation on that source's samples."""
import json

import pytest
import torch

from data_prep.prep import run_prep
from tests.conftest import REPO, read_metrics, tiny_train_overrides
from tests.data_prep.test_pipeline import _cfg, synthetic_corpus
from tests.helpers.launch import run_ranks

pytestmark = pytest.mark.slow  # every test here: `make test-fast` leaves the module out


def test_per_source_validation_matches_a_direct_computation(tmp_path):
    from slimpajama_train.data.dataset import DataConfig, open_dataset
    from slimpajama_train.data.loader import to_device_batch, val_loader
    from slimpajama_train.model import lm_loss
    from slimpajama_train.tools.load_checkpoint import load_model

    corpus = synthetic_corpus(tmp_path / "corpus", docs_per_source=40)
    shards = tmp_path / "shards"
    m = run_prep(_cfg(corpus, shards, holdout_ratio=0.3, seq_len=64))
    val = m["splits"]["val"]
    assert all(len(s["tokens_per_source"]) == 1 for s in val["shards"])  # one source per validation shard
    assert len({next(iter(s["tokens_per_source"])) for s in val["shards"]}) == 3

    run_dir = tmp_path / "run"
    proc = run_ranks(2, tiny_train_overrides(shards, run_dir, "trainer.eval_batches=2", steps=4), cwd=REPO)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 4
    assert "val_loss by source: RedPajamaBook" in proc.stderr  # the console line

    evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4]
    last = evals[-1]
    reported = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("val_loss/")}
    model, meta, _ = load_model(run_dir / "checkpoints" / "step_00000004")
    cfg = DataConfig(path=str(shards), micro_batch_size=2, num_workers=0, seed=meta["config"]["data"]["seed"])
    manifest, data_dir = open_dataset(cfg)
    loader = val_loader(cfg, manifest, data_dir, batches=2, global_batch=8, rank=0, world_size=1)
    losses: dict[str, list[float]] = {}
    with torch.no_grad():
        for batch, src in loader:
            inputs, targets = to_device_batch(batch, torch.device("cpu"))
            for loss, k in zip(lm_loss(model(inputs), targets, per_sample=True).tolist(), src.tolist(), strict=True):
                losses.setdefault(loader.dataset.sources[k], []).append(loss)
    print({k: (round(reported[k], 5), len(v)) for k, v in losses.items()})
    assert set(losses) == set(reported) and len(reported) == 3
    for name, values in losses.items():
        assert abs(reported[name] - sum(values) / len(values)) < 1e-5, name
        assert abs(last[f"val_ppl/{name}"] - torch.tensor(reported[name]).exp().item()) < 1e-3 * last[f"val_ppl/{name}"]
        assert last[f"val_tokens/{name}"] == len(values) * manifest["seq_len"]
    overall = sum(sum(v) for v in losses.values()) / sum(len(v) for v in losses.values())
    assert abs(last["val_loss"] - overall) < 1e-5
