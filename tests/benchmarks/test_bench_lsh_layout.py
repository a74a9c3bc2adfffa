"""bench_lsh_layout.py: a small planted run prints recall and precision per layout (figures come from running it)."""
import json
import subprocess
import sys

from tests.conftest import REPO


def test_bench_lsh_layout_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_lsh_layout.py"), "--pairs", "150",
                           "--controls", "50", "--background", "100", "--words", "150,400",
                           "--layouts", "128:16x8,128:21x6"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert set(out["layouts"]) == {"128:16x8", "128:21x6"} and "cheapest_passing" in out
    assert any(line.startswith("128:21x6") for line in lines[:-1])  # the table comes first
    planted = out["planted"]
    assert planted["pairs"] == 150 and 0.80 <= planted["pair_j_min"] <= planted["pair_j_max"] <= 0.85
    assert planted["control_j_max"] < 0.8
    for name, r in out["layouts"].items():
        assert 0.0 <= r["recall"] <= 1.0 and r["candidates_per_doc"] > 0 and r["dedup_mb_s_per_core"] > 0, name
        # The exact check decides: every removal is a planted duplicate, no control pair is removed.
        assert r["precision"] == 1.0 and r["control_removed"] == 0, name
    wide, narrow = out["layouts"]["128:21x6"], out["layouts"]["128:16x8"]
    assert wide["theory_p080"] > narrow["theory_p080"] and wide["recall"] >= 0.95
