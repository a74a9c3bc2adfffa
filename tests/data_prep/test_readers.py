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
    assert [(e["file"], e["line"]) for e in stats.errors] == [
        ("x.jsonl", 2), ("x.jsonl", 3), ("x.jsonl", 4), ("x.jsonl", 6)
    ]


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


def test_parquet_and_plain_text_folders(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"content": ["alpha doc", None, "gamma doc"], "domain": ["web", "web", "code"]})
    pq.write_table(table, tmp_path / "p.parquet")
    (tmp_path / "books").mkdir()
    (tmp_path / "books/b1.txt").write_text("a whole book\nin two lines\n")
    stats = PrepStats()
    files = expand_inputs([str(tmp_path / "*.parquet"), str(tmp_path / "books")])
    docs = list(JsonlReader(files, tmp_path, text_key="content", source_key="domain", stats=stats).run())
    assert [(d.id, d.text, d.source) for d in docs] == [
        ("books/b1.txt:1", "a whole book\nin two lines\n", "books"),
        ("p.parquet:1", "alpha doc", "web"),
        ("p.parquet:3", "gamma doc", "code"),
    ]
    assert [(e["file"], e["line"]) for e in stats.errors] == [("p.parquet", 2)]


def test_slimpajama_layout_glob(tmp_path):
    for c in (1, 2):
        for k in (0, 1):
            write_jsonl_zst(tmp_path / f"train/chunk{c}/example_train_{k}.jsonl.zst", [_rec(f"c{c}k{k}")])
    write_jsonl_zst(tmp_path / "validation/chunk1/example_holdout_0.jsonl.zst", [_rec("held out")])
    files = expand_inputs(["train/chunk*/example_train_*.jsonl.zst"], root=tmp_path)
    docs = list(JsonlReader(files, tmp_path).run())
    assert [d.text for d in docs] == ["c1k0", "c1k1", "c2k0", "c2k1"]
    assert docs[2].id == "train/chunk2/example_train_0.jsonl.zst:1"


# One test per kind of bad input: counted with file and line, and the valid documents around it kept.


def _read(tmp_path, *paths):
    stats = PrepStats()
    docs = list(JsonlReader(list(paths), tmp_path, stats=stats).run())
    return docs, stats.to_dict()["steps"][0]["drop_reasons"], [(e["file"], e["line"]) for e in stats.errors]


def test_bad_input_invalid_json(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps(_rec("ok 1")) + "\n{broken\n" + json.dumps(_rec("ok 2")) + "\n")
    docs, reasons, where = _read(tmp_path, p)
    assert [d.text for d in docs] == ["ok 1", "ok 2"] and reasons == {"invalid_json": 1} and where == [("a.jsonl", 2)]


def test_bad_input_invalid_utf8(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "bad \xc3\x28"}\n' + json.dumps(_rec("ok")).encode() + b"\n")
    docs, reasons, where = _read(tmp_path, p)
    assert [d.text for d in docs] == ["ok"] and reasons == {"invalid_utf8": 1} and where == [("a.jsonl", 1)]


def test_bad_input_missing_or_non_string_text(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(
        "\n".join([json.dumps({"meta": {}}), json.dumps({"text": ["x"]}), json.dumps(_rec("ok")), "[1, 2]"]) + "\n"
    )
    docs, reasons, where = _read(tmp_path, p)
    assert [d.text for d in docs] == ["ok"] and reasons == {"missing_text": 3}
    assert where == [("a.jsonl", 1), ("a.jsonl", 2), ("a.jsonl", 4)]


def test_bad_input_empty_files(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    write_jsonl_zst(tmp_path / "e.jsonl.zst", [])
    good = write_jsonl_zst(tmp_path / "g.jsonl.zst", [_rec("ok")])
    docs, reasons, where = _read(tmp_path, tmp_path / "e.jsonl", tmp_path / "e.jsonl.zst", good)
    assert [d.text for d in docs] == ["ok"] and reasons == {"empty_file": 2}
    assert where == [("e.jsonl", None), ("e.jsonl.zst", None)]


def test_bad_input_truncated_zst_reports_the_line(tmp_path):
    path = write_jsonl_zst(tmp_path / "t.jsonl.zst", [_rec(f"document number {i} " * 20) for i in range(2000)])
    path.write_bytes(path.read_bytes()[:-100])
    good = write_jsonl_zst(tmp_path / "u.jsonl.zst", [_rec("after")])
    docs, reasons, where = _read(tmp_path, path, good)
    texts = [d.text for d in docs]
    assert texts[-1] == "after" and 1500 < len(texts) - 1 < 2000 and reasons == {"truncated_file": 1}
    assert where == [("t.jsonl.zst", len(texts))]  # the first line not read in full
    assert texts[:-1] == [f"document number {i} " * 20 for i in range(len(texts) - 1)]  # no partial document


def test_bad_input_unreadable_file(tmp_path):
    missing = tmp_path / "gone.jsonl"
    missing.symlink_to(tmp_path / "nowhere.jsonl")  # listed, but opening fails
    (tmp_path / "dir.jsonl.gz").write_bytes(b"this is not gzip")
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps(_rec("ok")) + "\n")
    docs, reasons, where = _read(tmp_path, missing, tmp_path / "dir.jsonl.gz", good)
    # A missing file is the file system's problem; data that is not gzip is the file's.
    assert [d.text for d in docs] == ["ok"] and reasons == {"unreadable_file": 1, "undecodable_file": 1}
    assert [w[0] for w in where] == ["gone.jsonl", "dir.jsonl.gz"]


def test_bad_input_lone_surrogate_is_counted_and_the_rest_kept(tmp_path):
    # json.loads accepts "\ud800" and returns a str that UTF-8 cannot encode (every later step encodes).
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join([json.dumps(_rec("ok 1")), '{"text": "bad \\ud800 here"}',
                            json.dumps(_rec("pair \U0001F600")),
                            '{"text": "fine", "meta": {"redpajama_set_name": "x\\udc00"}}',
                            json.dumps(_rec("ok 2"))]) + "\n")
    assert "\\ud83d\\ude00" in p.read_text()  # a valid surrogate pair escape is kept
    docs, reasons, where = _read(tmp_path, p)
    assert [d.text for d in docs] == ["ok 1", "pair \U0001F600", "ok 2"] and [d.nbytes for d in docs] == [4, 9, 4]
    assert reasons == {"invalid_unicode": 2} and where == [("a.jsonl", 2), ("a.jsonl", 4)]


def test_json_arrays_json_lines_bz2_and_any_case_suffixes(tmp_path):
    import bz2

    d = tmp_path / "in"
    d.mkdir()
    # an array on many lines
    (d / "a.json").write_text(json.dumps([_rec("arr 1"), {"meta": {}}, _rec("arr 3")], indent=1))
    (d / "b.json").write_text(json.dumps(_rec("json line 1")) + "\n" + json.dumps(_rec("json line 2")) + "\n")
    (d / "C.JSONL").write_text(json.dumps(_rec("upper")) + "\n")
    with bz2.open(d / "d.jsonl.bz2", "wt") as fh:
        fh.write(json.dumps(_rec("bz2 1")) + "\n" + json.dumps(_rec("bz2 2")) + "\n")
    (d / "e.Json.GZ").write_bytes(gzip.compress(json.dumps([_rec("gz arr \ud83d\ude00")]).encode()))
    (d / "f.json").write_text('[{"text": "surrogate \\udfff"}, {"text": "kept"}]')
    (d / "g.json").write_text("\n  []\n")
    (d / "h.json").write_text('[{"text": "cut"')
    files = expand_inputs([str(d)])
    assert [f.name for f in files] == [
        "C.JSONL", "a.json", "b.json", "d.jsonl.bz2", "e.Json.GZ", "f.json", "g.json", "h.json"
    ]
    docs, reasons, where = _read(d, *files)
    assert [(x.id, x.text) for x in docs] == [
        ("C.JSONL:1", "upper"), ("a.json:1", "arr 1"), ("a.json:3", "arr 3"), ("b.json:1", "json line 1"),
        ("b.json:2", "json line 2"), ("d.jsonl.bz2:1", "bz2 1"), ("d.jsonl.bz2:2", "bz2 2"),
        ("e.Json.GZ:1", "gz arr \U0001F600"), ("f.json:2", "kept")]
    assert reasons == {"missing_text": 1, "invalid_unicode": 1, "empty_file": 1, "invalid_json": 1}
    assert where == [("a.json", 2), ("f.json", 1), ("g.json", None), ("h.json", 1)]


def test_unsupported_files_are_returned_as_skipped(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.jsonl", "sub/B.JSONL.ZST", "notes.md", "sub/x.csv", "y.jsonl.xz", ".hidden"):
        (tmp_path / name).write_text("")
    skipped = []
    files = expand_inputs([str(tmp_path)], skipped=skipped)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.jsonl", "sub/B.JSONL.ZST"]
    assert [f.relative_to(tmp_path).as_posix() for f in skipped] == [".hidden", "notes.md", "sub/x.csv", "y.jsonl.xz"]
    skipped = []
    assert expand_inputs([str(tmp_path / "*.*")], skipped=skipped) == [tmp_path / "a.jsonl"]  # a glob's matches too
    assert [f.name for f in skipped] == ["notes.md", "y.jsonl.xz"]


def test_clean_stage_and_report_list_skipped_files(tmp_path):
    from data_prep.config import PrepConfig, RunConfig
    from data_prep.retention_report import markdown
    from data_prep.stages import Context, clean_inputs

    chunk = tmp_path / "corpus/train"
    chunk.mkdir(parents=True)
    (chunk / "a.jsonl").write_text(json.dumps(_rec("a document long enough to be kept " * 10)) + "\n")
    (chunk / "b.jsonl.xz").write_bytes(b"\xfd7zXZ")
    (chunk / "README").write_text("about this corpus")
    cfg = PrepConfig(inputs=["train"], input_root=str(tmp_path / "corpus"), output_dir=str(tmp_path / "out"),
                     run=RunConfig(num_tasks=2))
    results = [clean_inputs(Context(cfg), i) for i in range(2)]
    stats = PrepStats()
    for r in results:
        stats.merge(PrepStats.from_dict(r["stats"]))
    sd = stats.to_dict()
    assert sd["steps"][0]["step"] == "read" and sd["steps"][0]["drop_reasons"] == {"unsupported_file": 2}  # listed once
    assert [(e["file"], e["line"]) for e in sd["errors"]] == [("train/README", None), ("train/b.jsonl.xz", None)]
    assert all(e["reason"].startswith("skipped: no reader") for e in sd["errors"])
    # write_report's JSON lists them as skipped_files, the Markdown in their own section
    skipped = [e for e in sd["errors"] if e["reason"].startswith("skipped:")]
    md = markdown(stats, {"dedup": {"rate_by_source": {}}, "decontam": {}, "steps": sd["steps"], "mixture": {},
                          "timings": {}, "stage_time": {}, "errors": sd["errors"], "skipped_files": skipped})
    assert "## Skipped input files (2)" in md and "- `train/b.jsonl.xz`: skipped: no reader" in md
