"""``slimpajama-demo``: the whole pipeline on this machine in a few minutes.

1. build the demo corpus from text every Python ships (``slimpajama-demo-corpus``),
2. prepare shards (``slimpajama-prep``: clean, dedup, split, tokenizer, pack),
3. train a tiny model on CPU with 2 processes (``torchrun ... slimpajama_train.train experiment=demo``),
4. sample text from the final checkpoint (``slimpajama-generate``).

The last line printed is one JSON object with the first/last train and validation losses, the
checkpoint path and the generated text. Extra arguments are Hydra overrides for the trainer.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _run(cmd: list[str]) -> str:
    """Run ``cmd``, streaming its stderr (progress) and returning its stdout."""
    print(f"\n$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"demo: step failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return proc.stdout


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit("demo: the step printed no JSON summary")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=".", help="where data/ and runs/ are created")
    p.add_argument("--nproc", type=int, default=2, help="training processes")
    p.add_argument("--prompt", default="def ")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the trainer, e.g. trainer.max_steps=100")
    a = p.parse_args(argv)
    work = Path(a.workdir).resolve()
    corpus, shards, run_dir = work / "data/demo_corpus", work / "data/demo_shards", work / "runs/demo"
    t0 = time.time()
    py = sys.executable

    _run([py, "-m", "data_prep.demo_corpus", str(corpus)])
    _run([py, "-m", "data_prep.prep", f"inputs=[{corpus}/train]", f"input_root={corpus}", f"output_dir={shards}"])
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
    summary = _last_json(_run([
        py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
        "-m", "slimpajama_train.train", "experiment=demo", f"data.path={shards}", f"run_dir={run_dir}", *a.overrides,
    ]))
    generated = _last_json(_run([py, "-m", "slimpajama_train.tools.generate", summary["checkpoint"],
                                 "--prompt", a.prompt, "--max-new-tokens", "48", "--json"]))["generated"]

    print("\n==== demo finished in %.0f s ====" % (time.time() - t0), file=sys.stderr)
    print(f"train loss: {summary['first_train_loss']:.3f} -> {summary['last_train_loss']:.3f}", file=sys.stderr)
    print(f"val loss:   {summary['first_val_loss']:.3f} -> {summary['last_val_loss']:.3f}", file=sys.stderr)
    print(f"checkpoint: {summary['checkpoint']}", file=sys.stderr)
    print(f"generated:\n{generated}\n", file=sys.stderr, flush=True)
    result = {k: summary[k]
              for k in ("first_train_loss", "last_train_loss", "first_val_loss", "last_val_loss", "checkpoint")}
    result["generated"] = generated
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
