"""What the loader's input checks cost, next to what they guard, measured in one run.

    python benchmarks/bench_data_checks.py --data data/demo_shards [--shards 75000] [--reads 2000]

- Token-id check (``TokenBlocks``: every sample's ids below the manifest's vocabulary, a max over the
  block just read): microseconds per sample, against the read it guards, and against the alternative of
  scanning a whole shard when it is first opened (with the random global order almost every read
  opens another shard, so a scan per open costs a shard's worth of work per sample).
- Shard-name check (``check_shard_names``, when the manifest is read): string tests per name, timed
  over ``--shards`` names as prep writes them.

Prints a table and, last, one JSON object with the figures and the ratios ``check_over_read`` and
``scan_over_check``. Absolute figures vary by machine (up to 3x here); the ratios come from one run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slimpajama_train.data.dataset import TokenBlocks, check_shard_names  # noqa: E402 - after the sys.path insert


def per_call(fn, n: int) -> float:
    """Seconds per call of ``fn``, the best of 3 rounds of ``n`` calls (the least disturbed)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a folder of shards with manifest.json (slimpajama-prep's output)")
    p.add_argument("--shards", type=int, default=75_000, help="names for the shard-name check (SlimPajama: ~75k)")
    p.add_argument("--reads", type=int, default=2_000)
    a = p.parse_args(argv)
    data = Path(a.data)
    manifest = json.loads((data / "manifest.json").read_text())
    ds = TokenBlocks(data, manifest, "train", seed=0, shuffle=False)
    block = ds[0].numpy()
    check = per_call(lambda: int(block.max()) >= ds.vocab_size, a.reads * 10)
    read = per_call(lambda: ds[0], a.reads)
    entry = manifest["splits"]["train"]["shards"][0]
    layout, width = manifest["record"], manifest["block_size"]

    def scan_shard() -> int:
        mm = np.memmap(data / entry["name"], dtype=np.uint8, mode="r")
        rec = mm[: entry["samples"] * layout["record_bytes"]].reshape(entry["samples"], layout["record_bytes"])
        start = 512 + layout["npy_header_bytes"]
        return int(rec[:, start:start + np.dtype(manifest["dtype"]).itemsize * width].view(manifest["dtype"]).max())

    scan = per_call(scan_shard, max(1, a.reads // 10))
    ds.close()
    names = [f"train-{i:06d}.tar" for i in range(a.shards)]
    t0 = time.perf_counter()
    check_shard_names(data, names, data / "manifest.json")
    names_s = time.perf_counter() - t0
    out = {
        "block_ids": width, "shard_samples": entry["samples"],
        "check_us_per_sample": check * 1e6, "read_us_per_sample": read * 1e6, "scan_us_per_shard": scan * 1e6,
        "check_over_read": check / read, "scan_over_check": scan / check,
        "shard_names": a.shards, "name_check_ms": names_s * 1e3, "name_check_us_per_shard": names_s / a.shards * 1e6,
    }
    print(f"{'token-id check per sample':34s} {out['check_us_per_sample']:9.2f} us  ({width} ids)")
    print(f"{'read of one sample':34s} {out['read_us_per_sample']:9.2f} us  (check/read {out['check_over_read']:.3f})")
    print(f"{'scan of a whole shard on open':34s} {out['scan_us_per_shard']:9.1f} us  "
          f"({entry['samples']} samples; {out['scan_over_check']:.0f}x the per-sample check)")
    print(f"{'shard-name check':34s} {out['name_check_ms']:9.1f} ms  ({a.shards:,} names, "
          f"{out['name_check_us_per_shard']:.2f} us each)")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
