import subprocess
import tarfile

import numpy as np
import pytest
import webdataset as wds

from data_prep.shard_format import RecordLayout, ShardReader, ShardWriter, token_dtype


def _write(path, n, block_size, dtype, shard_index=3):
    w = ShardWriter(path, shard_index, dtype)
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 60000, block_size).astype(dtype) for _ in range(n)]
    for _i, b in enumerate(blocks):
        w.add(b, {"src": block_size})
    return blocks, w.close(block_size)


@pytest.mark.parametrize("vocab", [32000, 100_000])
def test_random_access_matches_plain_webdataset(tmp_path, vocab):
    dtype = token_dtype(vocab)
    assert dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    path = tmp_path / "train-000003.tar"
    blocks, entry = _write(path, 37, 65, dtype)
    assert entry["samples"] == 37 and entry["tokens"] == 37 * 65 and entry["bytes"] == path.stat().st_size
    assert entry["tokens_per_source"] == {"src": 37 * 65}
    reader = ShardReader(path, 3, 65, dtype, RecordLayout.for_block(65, dtype))
    for i in (36, 0, 17):
        assert np.array_equal(reader.read(i), blocks[i])
    from_wds = [s["tokens.npy"] for s in wds.WebDataset(str(path), shardshuffle=False).decode()]
    assert len(from_wds) == 37 and all(np.array_equal(a, b) for a, b in zip(from_wds, blocks, strict=True))
    names = subprocess.run(["tar", "tf", str(path)], capture_output=True, text=True, check=True).stdout.split()
    assert names[0] == "000003-000000000.tokens.npy" and len(names) == 37


def test_writer_is_deterministic_and_atomic(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    _write(a, 5, 17, np.dtype(np.uint16))
    _write(b, 5, 17, np.dtype(np.uint16))
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
    with tarfile.open(a) as tf:
        assert {m.mtime for m in tf.getmembers()} == {0}


def test_reader_detects_foreign_shard(tmp_path):
    path = tmp_path / "x.tar"
    _write(path, 3, 17, np.dtype(np.uint16), shard_index=1)
    reader = ShardReader(path, 2, 17, np.dtype(np.uint16), RecordLayout.for_block(17, np.dtype(np.uint16)))
    with pytest.raises(ValueError, match="expected '000002-000000000"):
        reader.read(0)


def test_writer_bytes_equal_tarfile(tmp_path):
    """The fast writer produces exactly what tarfile writes for the same members."""
    import io

    from data_prep.shard_format import member_name, npy_bytes

    dtype = np.dtype(np.uint16)
    blocks, _ = _write(tmp_path / "fast.tar", 23, 65, dtype, shard_index=7)
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for i, b in enumerate(blocks):
            data = npy_bytes(b)
            info = tarfile.TarInfo(member_name(7, i))
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data), 0, 0o644, 0, 0, "", ""
            )
            tf.addfile(info, io.BytesIO(data))
    assert (tmp_path / "fast.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
