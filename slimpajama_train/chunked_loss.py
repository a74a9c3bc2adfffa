"""Output projection + cross-entropy over chunks of tokens, so the (tokens x vocab) fp32 logits never exist at once.

At 8 x 2048 tokens and a 32k vocabulary the plain path holds 2.1 GB of fp32 logits, their log-softmax and,
in backward, their gradient. Here each chunk's logits are computed, reduced to a per-row logsumexp and
loss, and dropped; backward recomputes them chunk by chunk. The result equals
``F.cross_entropy(F.linear(h, W).float(), t)`` (loss and both gradients) to fp32 rounding.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def chunk_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp32 loss and logsumexp of one chunk (rows whose target is ``ignore_index`` lose 0)."""
    logits = F.linear(hidden, weight).float()  # matmul in the compute dtype, softmax in fp32
    valid = targets != ignore_index
    target_logit = logits.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
    # torch.logsumexp's formula, max + log(sum(exp(x - max))), but in place: it would allocate two more
    # chunk-sized buffers (and on CPU page-faulting them in cost more than the arithmetic).
    row_max = logits.amax(dim=-1)
    lse = logits.sub_(row_max.unsqueeze(1)).exp_().sum(dim=-1).log_().add_(row_max)
    return torch.where(valid, lse - target_logit, 0.0), lse


def chunk_backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                   grad_rows: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one chunk: (d loss / d hidden rows, this chunk's share of d loss / d weight)."""
    logits = F.linear(hidden, weight).float()
    valid = targets != ignore_index
    # softmax - onehot, scaled by each row's upstream gradient; in place so one fp32 chunk lives at a time.
    grad = logits.sub_(lse.unsqueeze(1)).exp_()
    grad.scatter_add_(1, torch.where(valid, targets, 0).unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
    grad = grad.mul_(torch.where(valid, grad_rows, 0.0).unsqueeze(1)).to(hidden.dtype)
    return grad @ weight, grad.t() @ hidden


class ChunkKernels(NamedTuple):
    """The per-chunk functions the autograd function runs: eager, or ``torch.compile``d."""

    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor]]


EAGER_KERNELS = ChunkKernels(chunk_forward, chunk_backward)


@functools.cache
def compiled_kernels() -> ChunkKernels:
    """The per-chunk kernels under ``torch.compile`` (built once per process; the autograd function
    stays eager around them, so compile only fuses the softmax/gather/cast work of each chunk)."""
    return ChunkKernels(torch.compile(chunk_forward), torch.compile(chunk_backward))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-row losses of ``cross_entropy(hidden @ weight.T, targets)``; saves only hidden, weight,
    targets and the per-row logsumexp."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                ignore_index: int, kernels: ChunkKernels) -> torch.Tensor:
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(losses)
        for start in range(0, n, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            losses[rows], lse[rows] = kernels.forward(hidden[rows], weight, targets[rows], ignore_index)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_tokens, ctx.ignore_index, ctx.kernels = chunk_tokens, ignore_index, kernels
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight: torch.Tensor | None = None
        # On CPU, backward runs in the caller's thread and would inherit an enclosing autocast.
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_tokens):
                rows = slice(start, start + ctx.chunk_tokens)
                g_hidden, g_weight = ctx.kernels.backward(hidden[rows], weight, targets[rows], lse[rows],
                                                          grad_losses[rows], ctx.ignore_index)
                grad_hidden[rows] = g_hidden
                # Accumulate the weight gradient in fp32: summing bf16 partial products would round
                # once per chunk instead of once, as the unchunked matmul does.
                grad_weight = g_weight.float() if grad_weight is None else grad_weight.add_(g_weight)
        if grad_weight is None:  # no rows
            grad_weight = torch.zeros_like(weight)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk_tokens: int, per_sample_groups: int | None = None,
                                 ignore_index: int = IGNORE_INDEX,
                                 kernels: ChunkKernels = EAGER_KERNELS) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of ``hidden (..., d) @ weight (V, d).T`` against ``targets (...)``.

    ``chunk_tokens`` rows are projected at a time. ``per_sample_groups=B`` returns instead the mean loss
    of each of ``B`` equal groups of consecutive rows (one per sample, as ``lm_loss(..., per_sample=True)``).
    Under autocast, hidden and weight are cast to the autocast dtype here and the matmuls run with
    autocast off, so forward and (autocast-free) backward use the same dtype.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be >= 1")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    flat_targets = targets.reshape(-1)
    with torch.autocast(device_type, enabled=False):
        losses = ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, flat_targets,
                                                 chunk_tokens, ignore_index, kernels)
        if per_sample_groups is not None:
            return losses.view(per_sample_groups, -1).mean(dim=-1)
        # As F.cross_entropy's "mean": over the rows whose target is not ignored.
        return losses.sum() / (flat_targets != ignore_index).sum()
