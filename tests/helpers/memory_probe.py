"""Peak memory of training steps of a ``Transformer``, measured in a fresh process.

    python -m tests.helpers.memory_probe --vocab 32000 --micro-batch 8 --seq-len 2048 --loss-chunk 4096

Run from the repository root. Prints one JSON line: ``peak_bytes`` (the most memory the steps held above
what was resident just before them), the per-step ``losses``, and with ``--grads-out`` writes the first
step's gradients (``torch.save``; before any optimizer update). With ``--measure tensors`` (what the tests
use) the peak is the most bytes of tensor storages the steps created and held at once
(``tensor_memory.LiveTensorBytes``): the same figure on every machine and run. Otherwise, on CPU the
peak is the kernel's peak RSS (``ru_maxrss``, read as ``VmHWM`` after restarting it through
``/proc/self/clear_refs``) minus the RSS
before the steps: run it with ``MALLOC_MMAP_THRESHOLD_=65536`` (``run_probe`` does) so freed large
blocks return to the OS and the RSS follows live memory. On CUDA it is ``torch.cuda.max_memory_allocated``
above the allocation before the steps.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from slimpajama_train.model import AC_MODES, ModelConfig, Transformer
from tests.helpers.tensor_memory import LiveTensorBytes

REPO = Path(__file__).resolve().parents[2]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn-hidden", type=int, default=None, help="default: Llama's 8/3 x dim rule")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--loss-chunk", type=int, default=0, help="tokens per loss chunk; 0: unchunked")
    p.add_argument("--ac", default="none", choices=AC_MODES)
    p.add_argument("--ac-every", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS))
    p.add_argument("--steps", type=int, default=1, help="forward + backward + AdamW step, this many times")
    p.add_argument("--grads-out", default=None, help="write the first step's gradients here")
    p.add_argument("--measure", default="memory", choices=["memory", "tensors"],
                   help="memory: peak RSS on CPU, the allocator's peak on CUDA; "
                        "tensors: LiveTensorBytes (deterministic)")
    return p.parse_args(argv)


def build(a: argparse.Namespace) -> tuple[Transformer, torch.Tensor, torch.Tensor]:
    """The model (seed 0) and one fixed random micro-batch, on ``a.device``."""
    cfg = ModelConfig(dim=a.dim, n_layers=a.layers, n_heads=a.heads, vocab_size=a.vocab, max_seq_len=a.seq_len,
                      ffn_hidden=a.ffn_hidden)
    model = Transformer(cfg, seed=0).to(a.device)
    model.set_loss_chunk(a.loss_chunk)
    model.set_activation_checkpointing(a.ac, a.ac_every)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, a.vocab, (a.micro_batch, a.seq_len + 1), generator=g).to(a.device)
    return model, tokens[:, :-1], tokens[:, 1:]


def resident_bytes() -> int:
    """Current RSS of this process (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (``ru_maxrss``/``VmHWM``) from the current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    """Peak RSS since the start or the last :func:`reset_peak_rss` (``VmHWM``; ``ru_maxrss`` is the same count)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_steps(a: argparse.Namespace, model: Transformer, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """``a.steps`` training steps; the losses, and the first step's gradients saved to ``a.grads_out``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(a.steps):
        with torch.autocast(a.device, dtype=PRECISIONS[a.precision], enabled=a.precision != "fp32"):
            loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        if step == 0 and a.grads_out:
            torch.save({n: p.grad.detach().cpu() for n, p in model.named_parameters()}, a.grads_out)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def warm_up(a: argparse.Namespace, model: Transformer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One sample through forward and backward, and an AdamW step on a throwaway parameter, so one-time
    costs (thread pools, kernel workspaces, modules the optimizer imports lazily: ~30-40 MiB on CPU) are
    in the baseline, not in the step's peak. The model's weights are not changed."""
    with torch.autocast(a.device, dtype=PRECISIONS[a.precision], enabled=a.precision != "fp32"):
        loss = model(x[:1], y[:1])
    loss.backward()
    model.zero_grad(set_to_none=True)
    dummy = torch.zeros(1, device=a.device, requires_grad=True)
    dummy.grad = torch.zeros_like(dummy)
    torch.optim.AdamW([dummy]).step()


def measure(a: argparse.Namespace) -> dict:
    """Build and warm up, then run the steps, returning their peak memory above the state before them."""
    model, x, y = build(a)
    warm_up(a, model, x, y)
    gc.collect()
    if a.measure == "tensors":
        with LiveTensorBytes() as mem:
            losses = train_steps(a, model, x, y)
        peak = mem.peak
    elif a.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        losses = train_steps(a, model, x, y)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        reset = reset_peak_rss()
        base = resident_bytes()
        before = peak_rss() - base  # without the reset, the peak of building and warming up
        losses = train_steps(a, model, x, y)
        peak = peak_rss() - base
        if not reset and peak <= before:
            raise RuntimeError(f"the steps did not raise the process's peak RSS ({peak} <= {before} bytes before): "
                               "the figure would be the warm-up's")
    return {"peak_bytes": peak, "peak_mib": peak / 2**20, "losses": losses, "device": a.device,
            "loss_chunk": a.loss_chunk, "ac": a.ac, "measure": a.measure}


def run_probe(*args: str, timeout: float = 600) -> dict:
    """Run this probe with ``args`` in a fresh process from the repository root; its JSON result."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.memory_probe", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(parse_args())))
