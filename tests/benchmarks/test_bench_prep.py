"""bench_prep.py runs on a small corpus and prints its JSON contract (figures are checked by running it)."""
import json
import subprocess
import sys

from tests.conftest import REPO

KEYS = {"dedup_mb_s_per_core", "e2e_mb_s_per_core", "spm_encode_mb_s_per_core",
        "datasketch_slimpajama_mb_s_per_core", "dedup_peak_rss_mb"}


def test_bench_prep_smoke(demo_corpus, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_prep.py"), "--corpus", str(demo_corpus),
                           "--repeat", "1", "--datasketch-mb", "0.3", "--vocab-size", "500", "--tasks", "2",
                           "--work", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert KEYS <= set(out) and all(out[k] > 0 for k in KEYS)
    assert any("fuzzy dedup" in line for line in lines[:-1])  # the table comes first
    assert abs(out["e2e_over_spm"] - out["e2e_mb_s_per_core"] / out["spm_encode_mb_s_per_core"]) < 0.01
