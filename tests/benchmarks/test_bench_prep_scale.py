"""bench_prep_scale.py runs on tiny corpora and prints its JSON contract (figures are checked by running it)."""
import json
import math
import subprocess
import sys

import pytest

from benchmarks.bench_prep_scale import stage_list
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # every test here: `make test-fast` leaves the module out

SIZES = [500, 2000]  # documents: two sizes fit the line; each stage task is a process of its own


def test_bench_prep_scale_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_prep_scale.py"), "--sizes",
                           ",".join(map(str, SIZES)), "--tasks", "2", "--workdir", str(tmp_path / "work")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert any(line.startswith("stage") for line in lines[:-1])  # the table comes first
    assert out["sizes"] == SIZES and out["tasks"] == 2 and out["target_tasks"] == 64
    stages = stage_list()
    assert list(out["stages"]) == [name for name, _ in stages]  # every stage, in run order
    for name, parallel in stages:
        s = out["stages"][name]
        assert s["parallel"] == parallel and s["limit_gb"] == (8 if parallel else 64), name
        assert s["tasks"] == (2 if parallel else 1), name
        assert len(s["peak_rss_mb"]) == len(SIZES) and all(v > 0 for v in s["peak_rss_mb"]), name
        assert all(math.isfinite(s[k]) for k in ("bytes_per_doc", "intercept_mb", "extrapolated_gb_590m")), name
        assert isinstance(s["fits"], bool) and s["fits"] == (s["extrapolated_gb_590m"] <= s["limit_gb"]), name
        assert len(s["mb_s_per_core"]) == len(SIZES) and all(v > 0 for v in s["mb_s_per_core"]), name
        ratio = s["mb_s_per_core"][-1] / s["mb_s_per_core"][0]
        assert math.isclose(s["throughput_ratio_largest_vs_smallest"], ratio, rel_tol=0.01), name
    assert not list((tmp_path / "work").iterdir())  # corpora and outputs removed without --keep
