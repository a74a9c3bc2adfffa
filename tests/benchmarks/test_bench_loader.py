"""bench_loader.py on the demo shards and on a simulated split prints its JSON contract; the counts it
reports (opens, fetches, shards per batch) are deterministic, so the claims they support are checked."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # every test here: `make test-fast` leaves the module out

KEYS = {"requests_per_1k", "fetched_bytes_per_byte", "cache_hit_rate", "fetches_per_shard_epoch_mean",
        "fetches_per_shard_epoch_max", "source_share_dev_mean", "source_share_dev_max", "distinct_shards_per_batch",
        "position_shard_rank_corr"}


def _bench(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_loader.py"), *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[1].split()[0] == "order"  # the table comes first
    return json.loads(lines[-1])


def test_bench_loader_on_local_shards(demo_shards):
    out = _bench("--data", str(demo_shards), "--ks", "1,4", "--samples", "1024", "--global-batch", "32")
    rows = out["orders"]
    assert list(rows) == ["global", "blocks_k1", "blocks_k4"] and out["cache_shards"] == 8
    for row in rows.values():
        assert KEYS | {"samples_per_s", "opens_per_1k", "bytes_read_per_byte"} == set(row)
        assert row["samples_per_s"] > 0 and row["bytes_read_per_byte"] >= 1
    # The blocks order opens and fetches each of a block's shards once; the global order reopens
    # shards all the time (33 shards, 16 kept open) and fetches them many times per epoch.
    for k in (1, 4):
        assert rows[f"blocks_k{k}"]["fetches_per_shard_epoch_max"] == 1
        assert rows[f"blocks_k{k}"]["distinct_shards_per_batch"] <= 2 * k
    assert rows["global"]["opens_per_1k"] > 20 * rows["blocks_k4"]["opens_per_1k"]
    assert rows["global"]["fetches_per_shard_epoch_mean"] > 2


def test_bench_loader_simulates_a_split_without_files():
    out = _bench("--simulate-shards", "600", "--samples-per-shard", "64", "--ks", "16", "--samples", "2048")
    rows = out["orders"]
    assert out["shards"] == 600 and out["samples"] == 600 * 64 and set(rows) == {"global", "blocks_k16"}
    assert all(set(row) == KEYS for row in rows.values())
    assert rows["blocks_k16"]["fetches_per_shard_epoch_max"] == 1 and rows["blocks_k16"]["cache_hit_rate"] > 0.98
    assert rows["global"]["cache_hit_rate"] < 0.2  # a random sample of 600 shards rarely sits in a 32-shard cache
    # single-source shards: 16 shards per block mix sources worse than the global order
    assert rows["blocks_k16"]["source_share_dev_mean"] > rows["global"]["source_share_dev_mean"]


def test_bench_loader_through_a_local_s3_server(demo_shards):
    """--moto: the demo shards uploaded to moto's S3 server and read back through a cold 12-shard node
    cache: the blocks order (K=4, three blocks) fetches each shard about once; the global order, whose
    reads land on any of the 33 shards, fetches on most of them."""
    out = _bench("--data", str(demo_shards), "--moto", "--ks", "4", "--samples", "2048", "--cache-shards", "12",
                 "--global-batch", "32")
    rows = out["orders"]
    assert out["url"] == "s3://bench/shards"
    remote = {"remote_samples_per_s", "remote_requests_per_1k", "remote_fetched_bytes_per_byte",
              "remote_cache_hit_rate"}
    assert all(remote <= set(row) for row in rows.values())
    blocks, glob = rows["blocks_k4"], rows["global"]
    # 2048 samples = 8 shards of ~256 (2 blocks), and the third block prefetched: 12 requests, 5.9 per 1,000
    assert blocks["remote_requests_per_1k"] <= 1000 * 12 / 2048 + 1e-9
    assert blocks["remote_cache_hit_rate"] > 0.4  # block 1 was prefetched while block 0 was read
    assert glob["remote_requests_per_1k"] > 20 * blocks["remote_requests_per_1k"]
