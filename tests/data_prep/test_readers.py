import gzip
import json

import pytest

from data_prep.readers import JsonlReader, expand_inputs
from data_prep.stats import PrepStats
from tests.conftest import write_jsonl_zst


def _rec(text, source="RedPajamaC4"):
    return {"text": text, "meta": {"redpajama_set_name": source}}


def test_reads_jsonl_zst_gz_with_stable_ids(tmp_path):
    write_jsonl_zst(tmp_path / "train/chunk1/a.jsonl.zst", [_rec("one"), _rec("two", "RedPajamaBook")])
    (tmp_path / "train/chunk1/b.jsonl").write_text(json.dumps(_rec("three")) + "\n")
    with gzip.open(tmp_path / "train/chunk1/c.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(_rec("four")) + "\n")
    files = expand_inputs([str(tmp_path / "train/chunk*")])
    docs = list(JsonlReader(files, tmp_path).run())
    assert [d.text for d in docs] == ["one", "two", "three", "four"]
    assert [d.id for d in docs] == ["train/chunk1/a.jsonl.zst:1", "train/chunk1/a.jsonl.zst:2",
                                    "train/chunk1/b.jsonl:1", "train/chunk1/c.jsonl.gz:1"]
    assert docs[1].source == "RedPajamaBook"


def test_rank_slices_partition_files(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}.jsonl").write_text(json.dumps(_rec(f"doc{i}")) + "\n")
    files = expand_inputs([str(tmp_path)])
    parts = [[d.text for d in JsonlReader(files, tmp_path).run(rank=r, world_size=2)] for r in range(2)]
    assert sorted(parts[0] + parts[1]) == [f"doc{i}" for i in range(5)]
    assert not set(parts[0]) & set(parts[1])


def test_bad_lines_are_counted_with_file_and_line_and_the_rest_is_kept(tmp_path):
    lines = [json.dumps(_rec("good 1")), "{not json", json.dumps({"meta": {}}), json.dumps({"text": 5}),
             json.dumps(_rec("good 2"))]
    path = tmp_path / "x.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n')
    stats = PrepStats()
    docs = list(JsonlReader([path], tmp_path, stats=stats).run())
    assert [d.text for d in docs] == ["good 1", "good 2"]
    reasons = stats.to_dict()["steps"][0]["drop_reasons"]
    assert reasons == {"invalid_json": 1, "missing_text": 2, "invalid_utf8": 1}
    assert [(e["file"], e["line"]) for e in stats.errors] == [("x.jsonl", 2), ("x.jsonl", 3), ("x.jsonl", 4), ("x.jsonl", 6)]


def test_truncated_zst_keeps_what_was_read(tmp_path):
    path = write_jsonl_zst(tmp_path / "t.jsonl.zst", [_rec(f"document number {i} " * 20) for i in range(2000)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    stats = PrepStats()
    docs = list(JsonlReader([path], tmp_path, stats=stats).run())
    assert 0 < len(docs) < 2000
    assert stats.to_dict()["steps"][0]["drop_reasons"] == {"truncated_file": 1}


def test_missing_pattern_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        expand_inputs([str(tmp_path / "nothing_here/*.jsonl")])
