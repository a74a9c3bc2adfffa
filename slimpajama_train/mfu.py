"""Throughput, FLOPs, MFU and memory figures for the step metrics."""
from __future__ import annotations

import re
import resource
import sys

import torch

from slimpajama_train.model import ModelConfig


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights of every matrix multiply one token goes through, each counted once per use.

    Attention: q, k, v (GQA: ``kv_heads · head_dim`` wide) and o; SwiGLU: gate, up, down; all
    ``n_layers`` layers count, shared or not (``share_layers_every=k`` runs each distinct block k times).
    Embeddings: a full V×dim table is a lookup, not a matmul; factorized (``embedding_rank`` r), the
    r→dim ``embed_proj`` is one. Head: untied, ``lm_head`` is dim→V whatever the rank; tied with a rank,
    ``head_proj`` dim→r then the shared V×r table as r→V.
    """
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size must be resolved (from the data manifest) before counting FLOPs")
    q = cfg.n_heads * cfg.head_dim
    kv = cfg.kv_heads * cfg.head_dim
    per_layer = cfg.dim * q + 2 * cfg.dim * kv + q * cfg.dim + 3 * cfg.dim * cfg.hidden_dim
    r, V = cfg.embedding_rank, cfg.vocab_size
    if r is None:
        embed, head = 0, cfg.dim * V
    else:
        embed = r * cfg.dim
        head = cfg.dim * r + r * V if cfg.tie_embeddings else cfg.dim * V
    return cfg.n_layers * per_layer + embed + head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), PaLM's convention:
    6 · (matmul parameters, counted once per use) + 12 · layers · dim · seq_len for attention scores
    and values. Embedding lookups are not matmuls and are left out."""
    return 6.0 * matmul_params_per_token(cfg) + 12.0 * cfg.n_layers * cfg.dim * seq_len


# Dense (no 2:4 sparsity) bf16 tensor-core peaks, TFLOP/s per GPU, from NVIDIA's datasheets (which
# print the sparse figure, twice these). Patterns match torch.cuda.get_device_name(), most specific
# first; the first match wins.
#   H100 / H800: H100 datasheet: SXM 1,979, PCIe 1,513, NVL 1,671 sparse (H800 = H100 compute).
#   H200: H200 datasheet: SXM 1,979, NVL 1,671 sparse. GH200: GH200 datasheet, 1,979 sparse.
#   B200 / B100: HGX B200 4.5 PF, B100 3.5 PF sparse FP16/BF16 per GPU; GB200 NVL72: 5 PF sparse per GPU.
#   A100 / A800: A100 datasheet, 624 sparse (SXM and PCIe). L40S: 733 sparse. L4: 242 sparse.
#   A10: A10 datasheet, 250 sparse. A10G (AWS G5): a variant with less tensor throughput than the A10
#   (about 70 dense; AWS/NVIDIA publish no datasheet, so this one is approximate).
PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    (r"\bGH200\b", 989.0),
    (r"\bGB200\b", 2500.0),
    (r"\bH200\b.*\bNVL\b", 835.0),
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),  # "NVIDIA H100 80GB HBM3" (SXM)
    (r"\bH800\b.*\bPCIe\b", 756.0),
    (r"\bH800\b", 989.0),
    (r"\bB200\b", 2250.0),
    (r"\bB100\b", 1750.0),
    (r"\bA100\b", 312.0),  # "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-40GB"
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10G\b", 70.0),
    (r"\bA10\b", 125.0),
)


def peak_tflops_for(name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of the GPU called ``name`` (as ``torch.cuda.get_device_name`` reports
    it), or None for a GPU not in :data:`PEAK_TFLOPS_BF16`."""
    return next((peak for pattern, peak in PEAK_TFLOPS_BF16 if re.search(pattern, name, re.IGNORECASE)), None)


def detect_peak_tflops(device: torch.device) -> float | None:
    """The peak of this process's GPU; None on CPU or an unknown GPU (see :func:`mfu_off_reason`)."""
    if device.type != "cuda":
        return None
    return peak_tflops_for(torch.cuda.get_device_name(device))


def mfu_off_reason(device: torch.device) -> str | None:
    """A log line saying why MFU is not reported (no known peak for this device), or None if it is."""
    if detect_peak_tflops(device) is not None:
        return None
    what = f"GPU {torch.cuda.get_device_name(device)!r}" if device.type == "cuda" else f"device type {device.type!r}"
    return (f"MFU is off: no peak FLOP/s known for {what}; set trainer.peak_tflops=<dense bf16 TFLOP/s per device> "
            "to report it")


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or this process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def host_peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes (host memory, any device)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024)
