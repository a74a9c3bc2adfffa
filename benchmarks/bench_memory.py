"""Peak memory of one training step: unchunked vs chunked loss, and each activation checkpointing mode.

    python benchmarks/bench_memory.py [--device cpu|cuda] [--vocab 32000] [--micro-batch 8] [--seq-len 2048]
                                      [--dim 64] [--layers 1] [--loss-chunk 4096]

Every configuration runs one forward + backward + AdamW step of a ``Transformer`` on random tokens in a
fresh process (``tests/helpers/memory_probe.py``): on CPU the peak is the resident set above the one
before the step (with ``MALLOC_MMAP_THRESHOLD_`` set so it follows live memory), on CUDA
``torch.cuda.max_memory_allocated`` above the allocation before it. Rows: ``loss_chunk_tokens`` 0 vs
``--loss-chunk`` (no checkpointing), then activation checkpointing none / op / block (every 2nd) / full,
all with the chunked loss. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.helpers.memory_probe import run_probe  # noqa: E402 - after the sys.path insert above

AC_ROWS = ("none", "op", "block", "full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--loss-chunk", type=int, default=4096, help="tokens per loss chunk of the chunked rows")
    p.add_argument("--ac-every", type=int, default=2, help="period of block checkpointing")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    return p.parse_args(argv)


def measure(a: argparse.Namespace, loss_chunk: int, ac: str) -> dict:
    """One configuration's probe result (peak bytes and MiB, the step's loss)."""
    shape = ["--device", a.device, "--vocab", str(a.vocab), "--micro-batch", str(a.micro_batch),
             "--seq-len", str(a.seq_len), "--dim", str(a.dim), "--layers", str(a.layers), "--heads", str(a.heads),
             "--precision", a.precision, "--ac-every", str(a.ac_every)]
    out = run_probe(*shape, "--loss-chunk", str(loss_chunk), "--ac", ac, timeout=a.timeout)
    return {"loss_chunk": loss_chunk, "ac": ac, "peak_mib": round(out["peak_mib"], 1), "loss": out["losses"][0]}


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    loss_rows = [measure(a, 0, "none"), measure(a, a.loss_chunk, "none")]
    # The chunked, no-checkpointing configuration is the first checkpointing row: no need to run it twice.
    ac_rows = {"none": loss_rows[1], **{ac: measure(a, a.loss_chunk, ac) for ac in AC_ROWS[1:]}}
    logits_mib = a.micro_batch * a.seq_len * a.vocab * 4 / 2**20
    print(f"{a.device}, {a.precision}: vocab {a.vocab}, micro-batch {a.micro_batch} x {a.seq_len}, dim {a.dim}, "
          f"{a.layers} layers; fp32 logits {logits_mib:.0f} MiB")
    print(f"{'configuration':<28}{'peak MiB':>10}{'loss':>10}")
    for row in loss_rows:
        print(f"{'loss_chunk_tokens=' + str(row['loss_chunk']):<28}{row['peak_mib']:>10.0f}{row['loss']:>10.4f}")
    for ac, row in ac_rows.items():
        name = f"ac={ac}" + (f" (every {a.ac_every})" if ac == "block" else "")
        print(f"{name:<28}{row['peak_mib']:>10.0f}{row['loss']:>10.4f}")
    result = {
        "device": a.device, "precision": a.precision,
        "shape": {"vocab": a.vocab, "micro_batch": a.micro_batch, "seq_len": a.seq_len, "dim": a.dim,
                  "layers": a.layers, "heads": a.heads},
        "logits_fp32_mib": round(logits_mib, 1),
        "loss": {"chunk_tokens": a.loss_chunk, "unchunked_mib": loss_rows[0]["peak_mib"],
                 "chunked_mib": loss_rows[1]["peak_mib"],
                 "saved_mib": round(loss_rows[0]["peak_mib"] - loss_rows[1]["peak_mib"], 1)},
        "ac": {"every": a.ac_every, "loss_chunk_tokens": a.loss_chunk,
               **{f"{ac}_mib": row["peak_mib"] for ac, row in ac_rows.items()}},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
