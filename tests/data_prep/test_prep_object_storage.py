"""Prep from objects to a bucket (moto's S3 server on 127.0.0.1): the clean tasks stream the input
objects, the shards tasks upload each shard as it is written, the manifest goes up last, and the
shards are byte for byte those of a prep of the same files on disk."""
import json

import pytest

from data_prep import storage
from data_prep.prep import run_prep
from data_prep.shard_format import MANIFEST, load_manifest
from data_prep.stages import Context, claim_remote_output
from tests.conftest import small_prep_config

pytestmark = pytest.mark.slow  # a whole prep (the unmarked storage tests cover the pieces)


def test_prep_from_objects_to_a_bucket_gives_the_local_shards(s3_env, demo_corpus, demo_shards, tmp_path,
                                                              monkeypatch):
    s3_env.make_bucket("raw")
    s3_env.upload(demo_corpus, "s3://raw/corpus")
    s3_env.make_bucket("prepped")
    uploads: list[str] = []
    put = storage.put_file
    monkeypatch.setattr(storage, "put_file", lambda local, url: (uploads.append(url), put(local, url))[1])
    cfg = small_prep_config(demo_corpus, tmp_path, inputs=["s3://raw/corpus/train"], input_root="s3://raw/corpus",
                            output_dir="s3://prepped/shards", local_dir=str(tmp_path / "local"))
    manifest = run_prep(cfg)

    local = load_manifest(demo_shards)  # the same files prepared from disk
    assert manifest["splits"] == local["splits"] and manifest["tokenizer"] == local["tokenizer"]
    assert manifest == load_manifest("s3://prepped/shards")
    names = [s["name"] for split in manifest["splits"].values() for s in split["shards"]]
    s3 = s3_env.client()
    for s in (s for split in manifest["splits"].values() for s in split["shards"]):
        head = s3.head_object(Bucket="prepped", Key=f"shards/{s['name']}")
        assert head["ContentLength"] == s["bytes"]
    # each shard uploaded once, as written (and removed locally), the other outputs after, the manifest last
    assert uploads[-1] == "s3://prepped/shards/manifest.json"
    assert sorted(uploads[:len(names)]) == sorted(f"s3://prepped/shards/{n}" for n in names)
    assert {"tokenizer.model", "prep_report.md"} <= {u.rsplit("/", 1)[1] for u in uploads[len(names):]}
    assert not list((tmp_path / "local").glob("*.tar"))
    bad = json.loads(storage.read_bytes("s3://prepped/shards/prep_report.json"))["bad_input"]
    assert bad["files_total"] == 0, bad  # every object was read in full

    # Another dataset's manifest at the URL is never overwritten unasked; run.force removes it first.
    other = small_prep_config(demo_corpus, tmp_path, inputs=["s3://raw/corpus/train"], input_root="s3://raw/corpus",
                              output_dir="s3://prepped/shards", local_dir=str(tmp_path / "other"), seq_len=32)
    with pytest.raises(FileExistsError, match="manifest of another dataset.*run.force=true"):
        claim_remote_output(Context(other))
    assert storage.exists("s3://prepped/shards/" + MANIFEST)
    forced = small_prep_config(demo_corpus, tmp_path, inputs=["s3://raw/corpus/train"], input_root="s3://raw/corpus",
                               output_dir="s3://prepped/shards", local_dir=str(tmp_path / "other"), seq_len=32,
                               force=True)
    claim_remote_output(Context(forced))
    assert not storage.exists("s3://prepped/shards/" + MANIFEST)


def test_an_object_output_needs_a_local_folder_and_a_url_with_credentials_is_refused(demo_corpus, tmp_path):
    with pytest.raises(ValueError, match="output_dir=s3://b/shards: writing to object storage needs run.local_dir"):
        small_prep_config(demo_corpus, tmp_path, output_dir="s3://b/shards")
    with pytest.raises(ValueError, match=r"inputs\[0\]: a URL with credentials"):
        small_prep_config(demo_corpus, tmp_path, inputs=["s3://KEY:SECRET@raw/corpus"])
