import json

import pytest
import zstandard

from data_prep.demo_corpus import build_demo_corpus


@pytest.mark.slow
def test_layout_sources_and_byte_identical(tmp_path):
    a = build_demo_corpus(tmp_path / "a", max_bytes_per_source=200_000, docs_per_file=50)
    b = build_demo_corpus(tmp_path / "b", max_bytes_per_source=200_000, docs_per_file=50)
    assert a == b and set(a) == {"RedPajamaGithub", "RedPajamaWikipedia", "RedPajamaBook", "RedPajamaCommonCrawl"}
    files_a = sorted((tmp_path / "a/train/chunk1").glob("example_train_*.jsonl.zst"))
    assert len(files_a) > 1
    for fa in files_a:
        assert fa.read_bytes() == (tmp_path / "b/train/chunk1" / fa.name).read_bytes()
    first = zstandard.ZstdDecompressor().decompress(files_a[0].read_bytes()).decode().splitlines()
    recs = [json.loads(line) for line in first]
    assert all(isinstance(r["text"], str) and r["meta"]["redpajama_set_name"] in a for r in recs)
    assert {r["meta"]["redpajama_set_name"] for r in recs} == set(a)  # chunks mix domains
    code = next(r for r in recs if r["meta"]["redpajama_set_name"] == "RedPajamaGithub")
    compile(code["text"], code["meta"]["path"], "exec")  # real Python source
