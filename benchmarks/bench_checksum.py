"""GB/s of the checksums a checkpoint could record (``checkpoint.py`` uses ``CHECKSUM``).

    python benchmarks/bench_checksum.py [--mib 512] [--dir /path/on/the/checkpoint/filesystem]

Hashes one in-memory buffer (no disk) with each candidate, in the chunk size the checkpointer reads
files with: the CPU cost per GB on top of the read. Then writes the buffer as a file under ``--dir``
and times what a save adds with the chosen checksum: ``hash_own_files`` reading it back (from the
page cache, as right after a rank wrote its shard).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import zlib
from pathlib import Path


def _hashlib(name: str):
    def run(view: memoryview, chunk: int) -> str:
        h = hashlib.new(name)
        for i in range(0, len(view), chunk):
            h.update(view[i:i + chunk])
        return h.hexdigest()
    return run


def _crc32(view: memoryview, chunk: int) -> str:
    c = 0
    for i in range(0, len(view), chunk):
        c = zlib.crc32(view[i:i + chunk], c)
    return f"{c:08x}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="write the test file here (default: a temporary directory)")
    args = ap.parse_args()
    from slimpajama_train.checkpoint import CHECKSUM, READ_CHUNK

    buf = memoryview(os.urandom(args.mib << 20))
    candidates = {"sha256": _hashlib("sha256"), "blake2b": _hashlib("blake2b"), "crc32 (zlib)": _crc32}
    try:
        import xxhash

        def _xxh(view: memoryview, chunk: int) -> str:
            h = xxhash.xxh3_128()
            for i in range(0, len(view), chunk):
                h.update(view[i:i + chunk])
            return h.hexdigest()
        candidates["xxh3_128 (xxhash, not a dependency)"] = _xxh
    except ImportError:
        pass
    for name, fn in candidates.items():
        best = min(_timed(fn, buf, READ_CHUNK) for _ in range(args.repeat))
        gbs = len(buf) / best / 1e9
        chosen = " <- checkpoint.py" if name == CHECKSUM else ""
        print(f"{name:40s} {gbs:6.2f} GB/s  {1 / gbs:6.2f} s per GB{chosen}")
    _read_back(buf, args.dir, args.repeat)


def _read_back(buf: memoryview, where: str | None, repeat: int) -> None:
    from slimpajama_train.checkpoint import CHECKSUM, hash_own_files

    with tempfile.TemporaryDirectory(dir=where) as d:
        shard = Path(d) / "state" / "__0_0.distcp"
        shard.parent.mkdir()
        t0 = time.perf_counter()
        with open(shard, "wb") as fh:
            fh.write(buf)
        write_s = time.perf_counter() - t0
        best = min(_timed(lambda *_: hash_own_files(Path(d), 0, 1), buf, 0) for _ in range(repeat))
        gbs = len(buf) / best / 1e9
        print(f"save of one {len(buf) >> 20} MiB shard: write {write_s:.2f} s (to the page cache); "
              f"{CHECKSUM} read-back {best:.2f} s = {gbs:.2f} GB/s, {1 / gbs:.2f} s per GB")


def _timed(fn, buf: memoryview, chunk: int) -> float:
    t0 = time.perf_counter()
    fn(buf, chunk)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
