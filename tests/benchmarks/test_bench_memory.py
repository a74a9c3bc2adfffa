"""bench_memory.py: tiny sizes on CPU print the table and the JSON contract (figures come from running it)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # every test here: `make test-fast` leaves the module out


def test_bench_memory_cpu_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_memory.py"), "--device", "cpu",
                           "--vocab", "512", "--micro-batch", "2", "--seq-len", "64", "--dim", "32", "--layers", "2",
                           "--heads", "2", "--loss-chunk", "32"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert any(line.startswith("loss_chunk_tokens=0") for line in lines[:-1])  # the table comes first
    assert out["device"] == "cpu" and out["shape"]["vocab"] == 512 and out["logits_fp32_mib"] == 0.2
    loss, ac = out["loss"], out["ac"]
    assert loss["chunk_tokens"] == 32 and loss["unchunked_mib"] > 0 and loss["chunked_mib"] > 0
    assert loss["saved_mib"] == round(loss["unchunked_mib"] - loss["chunked_mib"], 1)
    assert set(ac) == {"every", "loss_chunk_tokens", "none_mib", "op_mib", "block_mib", "full_mib"}
    assert all(ac[f"{mode}_mib"] > 0 for mode in ("none", "op", "block", "full"))
