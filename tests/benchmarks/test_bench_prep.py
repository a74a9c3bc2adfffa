"""bench_prep.py runs on a small corpus and prints its JSON contract (figures are checked by running it)."""
import json
import subprocess
import sys

from tests.conftest import REPO

KEYS = {"dedup_mb_s_per_core", "dedup_stages_in_e2e_mb_s_per_core",
        "e2e_mb_s_per_core_over_input", "spm_encode_mb_s_per_core_over_input",
        "e2e_mb_s_per_core_over_tokenized", "spm_encode_mb_s_per_core_over_tokenized",
        "datasketch_slimpajama_mb_s_per_core", "dedup_peak_rss_mb", "input_mb", "tokenized_mb"}


def test_bench_prep_smoke(demo_corpus, tmp_path):
    # An explicit band layout (--bands/--rows) also checks that the option reaches dedup.
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_prep.py"), "--corpus", str(demo_corpus),
                           "--repeat", "1", "--datasketch-mb", "0.3", "--vocab-size", "500", "--tasks", "2",
                           "--bands", "21", "--rows", "6", "--work", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert KEYS <= set(out) and all(out[k] > 0 for k in KEYS)
    assert any("fuzzy dedup" in line for line in lines[:-1])  # the table comes first
    assert any("character 13-grams, first" in line for line in lines[:-1])
    # Like with like: both rates over the same bytes, so the ratio is the same on either basis.
    for basis in ("input", "tokenized"):
        ratio = out[f"e2e_mb_s_per_core_over_{basis}"] / out[f"spm_encode_mb_s_per_core_over_{basis}"]
        assert abs(out["e2e_over_spm"] - ratio) < 0.01
    assert out["tokenized_mb"] <= out["input_mb"]
    assert out["dedup_layout"] == "21x6" and out["dedup_num_perm"] == 128
