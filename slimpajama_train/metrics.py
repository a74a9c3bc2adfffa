"""Throughput, MFU and memory figures for the step metrics."""
from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) by device name fragment.
PEAK_TFLOPS_BF16 = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def detect_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or this process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
