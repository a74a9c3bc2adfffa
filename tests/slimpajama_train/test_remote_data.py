"""Training data at a URL: shards read from a real S3 endpoint (moto's server on 127.0.0.1) through the
node's shard cache give the samples the local shards give, in either order; the faults a store has
(an outage, a missing or truncated object, wrong credentials, a full cache) lose and repeat nothing
or stop with a message naming the URL and what to do."""
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep import storage
from data_prep.shard_format import load_manifest
from slimpajama_train.data.dataset import CacheSpec, DataConfig, TokenBlocks, check_cache_fits, open_dataset
from slimpajama_train.data.shard_cache import ShardFetchError
from tests.conftest import rank_exit_statuses, tiny_train_overrides
from tests.helpers.equivalence import assert_bitwise_same
from tests.helpers.launch import HELPERS, run_ranks

BLOCKS = {"order": "blocks", "block_shards": 4}


def _samples(ds: TokenBlocks, positions) -> np.ndarray:
    return np.stack([ds[int(p)].numpy() for p in positions])


def _cache(tmp_path: Path, limit_gb: float = 1.0, retries: int = 5, backoff_s: float = 1.0) -> CacheSpec:
    return DataConfig(path="s3://x", cache_dir=str(tmp_path / "cache"), cache_limit_gb=limit_gb,
                      fetch_retries=retries, fetch_backoff_s=backoff_s).cache_spec()


def test_a_url_location_stays_a_url_and_one_with_credentials_is_refused():
    assert storage.join("s3://bucket/shards/", "manifest.json") == "s3://bucket/shards/manifest.json"
    assert storage.is_remote("gs://b/x") and not storage.is_remote("file:///tmp/x") and not storage.is_remote("/a")
    with pytest.raises(ValueError, match="data.path: a URL with credentials"):
        DataConfig(path="s3://AKIAXXXX:secret@bucket/shards")


@pytest.mark.parametrize("order", [{}, BLOCKS], ids=["global", "blocks"])
def test_shards_from_s3_through_the_cache_are_the_local_ones(s3_env, s3_demo_shards, demo_shards, tmp_path, order):
    manifest = load_manifest(s3_demo_shards)
    assert manifest == load_manifest(demo_shards)
    remote = TokenBlocks(s3_demo_shards, manifest, "train", seed=7, shuffle=True, cache=_cache(tmp_path), **order)
    local = TokenBlocks(demo_shards, manifest, "train", seed=7, shuffle=True, **order)
    positions = np.arange(0, int(1.5 * len(local)), 7)  # one and a half epochs
    assert np.array_equal(_samples(remote, positions), _samples(local, positions))
    n_shards = len(manifest["splits"]["train"]["shards"])
    # Every shard fetched once (the limit holds the split): in the blocks order, the prefetch of the next
    # block has fetched ahead.
    assert remote._cache.fetched <= n_shards
    remote.close()


def test_the_store_down_for_10_s_mid_epoch_skips_and_repeats_nothing(s3_env, s3_demo_shards, demo_shards, tmp_path):
    """The endpoint refuses connections for 10 s while the loader is in the middle of an epoch: the
    fetches retry with backoff (1, 2, 4, 8 s) and the samples are those of an uninterrupted read."""
    manifest = load_manifest(demo_shards)
    remote = TokenBlocks(s3_demo_shards, manifest, "train", seed=3, shuffle=True, cache=_cache(tmp_path), **BLOCKS)
    local = TokenBlocks(demo_shards, manifest, "train", seed=3, shuffle=True, **BLOCKS)
    positions = np.arange(len(local))
    half = len(positions) // 2
    got = [remote[int(p)].numpy() for p in positions[:half]]
    fetched_before = remote._cache.fetched
    outage = s3_env.outage(10.0)
    got += [remote[int(p)].numpy() for p in positions[half:]]
    outage.join()
    assert remote._cache.fetched > fetched_before  # shards were fetched during or after the outage
    assert np.array_equal(np.stack(got), _samples(local, positions))
    remote.close()


def _own_copy(s3_server, demo_shards: Path, bucket: str) -> str:
    s3_server.make_bucket(bucket)
    return s3_server.upload(demo_shards, f"s3://{bucket}/shards")


def test_a_shard_missing_or_truncated_in_the_bucket_is_named(s3_env, demo_shards, tmp_path):
    url = _own_copy(s3_env, demo_shards, "faulty")
    manifest = load_manifest(url)
    shards = manifest["splits"]["train"]["shards"]
    gone, cut = shards[0]["name"], shards[1]["name"]
    s3 = s3_env.client()
    s3.delete_object(Bucket="faulty", Key=f"shards/{gone}")
    s3.put_object(Bucket="faulty", Key=f"shards/{cut}", Body=(demo_shards / cut).read_bytes()[:1000])
    ds = TokenBlocks(url, manifest, "train", seed=0, shuffle=False, cache=_cache(tmp_path, retries=1, backoff_s=0.01))
    with pytest.raises(ShardFetchError, match=rf"s3://faulty/shards/{gone} does not exist"):
        ds[0]  # position 0 of the unshuffled order: sample 0 of shard 0
    truncated = rf"1000 bytes fetched, the manifest says {shards[1]['bytes']}"
    with pytest.raises(ShardFetchError, match=rf"s3://faulty/shards/{cut}: not fetched whole and intact after 2 "
                                              rf"attempts .*{truncated}"):
        ds[shards[0]["samples"]]
    assert not list((tmp_path / "cache" / ".tmp").iterdir())  # nothing partial left behind
    ds.close()


def test_wrong_credentials_are_refused_naming_the_url(s3_env, s3_demo_shards, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(PermissionError, match=rf"data.path='{s3_demo_shards}'.*access denied.*AWS_ACCESS_KEY_ID"):
        open_dataset(DataConfig(path=s3_demo_shards))


def test_a_cache_too_small_for_the_order_is_refused_at_start_up(demo_shards):
    manifest = load_manifest(demo_shards)
    train = [s["bytes"] for s in manifest["splits"]["train"]["shards"]]
    val = sum(s["bytes"] for s in manifest["splits"]["val"]["shards"])
    gb = (3 * 4 * max(train) + val) / 2**30
    blocks = dict(path="s3://b/shards", order="blocks", block_shards=4)
    check_cache_fits(DataConfig(**blocks, cache_limit_gb=gb), manifest, "s3://b/shards")  # just fits
    with pytest.raises(ValueError, match=r"data.cache_limit_gb=.*3 blocks of 4 shards.*raise data.cache_limit_gb"):
        check_cache_fits(DataConfig(**blocks, cache_limit_gb=gb * 0.99), manifest, "s3://b/shards")
    with pytest.raises(ValueError, match="the whole train split"):  # the global order reads any shard any time
        check_cache_fits(DataConfig(path="s3://b/shards", cache_limit_gb=gb), manifest, "s3://b/shards")
    check_cache_fits(DataConfig(path=str(demo_shards), cache_limit_gb=1e-9), manifest, demo_shards)  # read in place


def test_in_blocks_order_a_node_fetches_each_shard_at_most_1_1_times_per_epoch(demo_shards, tmp_path):
    """Two ranks of one node share a cache that holds three blocks (what check_cache_fits asks) and
    read three epochs of their slices of each global batch: each shard is fetched about once per
    epoch, where the global order through the same cache fetches on nearly every read."""
    manifest = load_manifest(demo_shards)
    shards = manifest["splits"]["train"]["shards"]
    limit = 3 * 4 * max(s["bytes"] for s in shards)
    fetched = {}
    for order in ("blocks", "global"):
        spec = CacheSpec(str(tmp_path / f"cache_{order}"), limit, retries=0, backoff_s=0.0)
        # 16 open shards per process (the default) in the blocks order, where 12 fill the cache: each
        # process lets go of a block's shards when it enters the next. The global order keeps 4.
        ranks = [TokenBlocks(demo_shards, manifest, "train", seed=5, shuffle=True, order=order, block_shards=4,
                             max_open_shards=16 if order == "blocks" else 4, cache=spec) for _ in range(2)]
        G, epochs = 32, 3 if order == "blocks" else 0.125  # the global order: an eighth of an epoch shows it
        for b in range(int(epochs * len(ranks[0])) // G):
            for r, ds in enumerate(ranks):
                for p in range(b * G + r * G // 2, b * G + (r + 1) * G // 2):
                    ds[p]
        fetched[order] = sum(ds._cache.fetched for ds in ranks) / (epochs * len(shards))
        for ds in ranks:
            ds.close()
    print(f"fetches per shard per epoch: {json.dumps(fetched)}")
    assert fetched["blocks"] <= 1.1
    assert fetched["global"] > 20 * fetched["blocks"]



@pytest.mark.slow
def test_training_from_a_bucket_resumes_bitwise_after_sigterm_and_records_no_credentials(
        s3_server, s3_demo_shards, demo_shards, tiny_runs, tmp_path):
    """2 ranks train from ``s3://`` through the node cache, SIGTERM on one rank mid-run (as SLURM
    preempts), exit 75 on both, resume: every step and the final parameters as an uninterrupted run
    from the local shards in the same order, bit for bit. No file the run wrote (config.json, meta.json,
    metrics, logs, W&B's offline files) holds the key or the secret. Eval scores the bucket's val split
    as it scores the local one."""
    blocks = ("data.order=blocks", "data.block_shards=4")
    run_dir = tmp_path / "run"
    over = tiny_train_overrides(s3_demo_shards, run_dir, *blocks, f"data.cache_dir={tmp_path / 'cache'}",
                                "logger.wandb.enabled=true", "logger.wandb.mode=offline")
    first = run_ranks(2, over, script=HELPERS / "crash_helper.py", exit_status=tmp_path / "status", check=False,
                      extra_env={**s3_server.env, "CRASH_AT": "signal", "CRASH_STEP": "3", "CRASH_RANK": "1",
                                 "CRASH_SIGNAL": "SIGTERM"})
    assert rank_exit_statuses(tmp_path / "status") == {0: 75, 1: 75}, first.stderr[-3000:]
    resumed = run_ranks(2, over, extra_env=s3_server.env)
    assert "resumed from" in resumed.stderr
    assert_bitwise_same(run_dir, tiny_runs.get("fsdp2", 2, 8, *blocks))
    assert json.loads((run_dir / "config.json").read_text())["config"]["data"]["path"] == s3_demo_shards
    for secret in (s3_server.secret, s3_server.key_id):
        holding = [p for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert not holding, f"credentials written to {holding}"

    from slimpajama_train.tools.evaluate import evaluate, parse_args

    scores = {}
    for where in (s3_demo_shards, str(demo_shards)):
        with pytest.MonkeyPatch.context() as mp:
            for k, v in s3_server.env.items():
                mp.setenv(k, v)
            args = parse_args([str(run_dir), "--data", where, "--max-batches", "2", "--cache-dir",
                               str(tmp_path / "eval_cache")])
            scores[where] = evaluate(args)["perplexity"]["loss"]
    assert scores[s3_demo_shards] == scores[str(demo_shards)]


def test_locations_that_cannot_be_urls_yet_are_refused_with_what_to_do():
    """Checkpoints on object storage are not built yet: a URL there is refused by name, not turned
    into a local folder called ``s3:`` (``Path`` folds ``s3://b`` into ``s3:/b``)."""
    from slimpajama_train.checkpoint import CheckpointConfig
    from slimpajama_train.config import TrainConfig

    for kwargs, key in (({"run_dir": "s3://b/run"}, "run_dir"),
                        ({"checkpoint": CheckpointConfig(dir="gs://b/ckpt")}, "checkpoint.dir"),
                        ({"resume_from": "s3://b/run/checkpoints/step_00000004"}, "resume_from")):
        with pytest.raises(ValueError, match=rf"{key}=.*not supported yet.*local or shared path"):
            TrainConfig(**kwargs)


def test_a_loader_process_keeps_under_100_bytes_per_shard_through_the_cache(tmp_path):
    """What a loader process holds for SlimPajama's 75k shards read from a URL through the cache, in
    the blocks order: fixed-width arrays per shard (name, size, sha256, source, sample offsets, the
    epoch's permutation: ~90 bytes, 6.7 MB), no object per shard and nothing per sample. Traced."""
    import tracemalloc

    from data_prep.shard_format import RecordLayout

    n = 75_000
    shards = [{"name": f"train-{i:06d}.tar", "bytes": 4096 * 4608, "samples": 4096, "tokens_per_source": {"cc": 1},
               "sha256": f"{i:064x}"} for i in range(n)]
    record = RecordLayout.for_block(2049, np.dtype("uint16")).__dict__
    manifest = {"dtype": "uint16", "block_size": 2049, "record": record,
                "tokenizer": {"vocab_size": 32000}, "splits": {"train": {"shards": shards}}}
    tracemalloc.start()
    ds = TokenBlocks("s3://bucket/shards", manifest, "train", seed=0, shuffle=True, order="blocks", block_shards=64,
                     cache=CacheSpec(str(tmp_path / "cache"), 2**40))
    ds.order.epoch_layout(3)  # what the first read of an epoch builds
    kept = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"{kept / n:.0f} bytes per shard, {kept / 2**20:.1f} MiB at {n} shards")
    assert kept < 100 * n


@pytest.mark.slow
def test_export_generate_and_eval_take_a_run_copied_to_a_bucket(s3_env, tiny_runs, tmp_path, monkeypatch):
    """A run folder copied to a bucket (``aws s3 sync``) is read by export, generate (``load_model``)
    and eval from its URL: ``latest`` followed, the checkpoint fetched once into the local cache, and
    the export is byte for byte the one from the local run."""
    import tempfile

    import torch

    from slimpajama_train.tools.evaluate import load_for_eval
    from slimpajama_train.tools.export import export_checkpoint
    from slimpajama_train.tools.load_checkpoint import load_model

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the checkpoint cache's parent
    (tmp_path / "tmp").mkdir()
    run = tiny_runs.get("fsdp2", 2, 8)
    s3_env.make_bucket("runs")
    url = s3_env.upload(run, "s3://runs/tiny")
    export_checkpoint(url, tmp_path / "from_bucket")
    export_checkpoint(run, tmp_path / "from_disk")
    for f in ("model.safetensors", "config.json", "tokenizer.model"):
        assert (tmp_path / "from_bucket" / f).read_bytes() == (tmp_path / "from_disk" / f).read_bytes(), f
    model, meta, ckpt = load_model(url)
    assert ckpt.name.endswith("step_00000008") and meta["step"] == 8
    local_model, _, _ = load_model(run)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local_model.state_dict().values(),
                                                 strict=True))
    assert load_for_eval(f"{url}/checkpoints/step_00000004", "cpu")[1]["step"] == 4
    assert len(list((tmp_path / "tmp" / "slimpajama_checkpoint_cache").iterdir())) == 2  # step 8 once, step 4
