"""bench_data_checks.py: prints the loader checks' costs and ratios (figures come from running it)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # every test here: `make test-fast` leaves the module out


def test_bench_data_checks_smoke(demo_shards, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_data_checks.py"), "--data", str(demo_shards),
                           "--shards", "1000", "--reads", "50"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert lines[0].startswith("token-id check per sample") and out["block_ids"] == 65 and out["shard_names"] == 1000
    assert out["check_over_read"] == pytest.approx(out["check_us_per_sample"] / out["read_us_per_sample"])
    assert out["scan_over_check"] == pytest.approx(out["scan_us_per_shard"] / out["check_us_per_sample"])
    assert all(out[k] > 0 for k in ("check_us_per_sample", "read_us_per_sample", "scan_us_per_shard", "name_check_ms"))
