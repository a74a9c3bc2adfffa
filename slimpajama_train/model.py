"""Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention via ``scaled_dot_product_attention``.

Weight names and the RoPE convention (rotate-half) follow Hugging Face ``LlamaForCausalLM``, so export
is a rename, not a permutation.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from slimpajama_train.chunked_loss import EAGER_KERNELS, ChunkKernels, chunked_linear_cross_entropy, compiled_kernels

AC_MODES = ("none", "block", "op", "full")


@dataclass
class ModelConfig:
    """Model shape.

    Attributes:
        dim: hidden size.
        n_layers: transformer blocks.
        n_heads: query heads; ``dim`` must divide by it.
        n_kv_heads: key/value heads (GQA); None means ``n_heads`` (plain multi-head attention).
        vocab_size: None takes the tokenizer's size from the data manifest.
        ffn_hidden: SwiGLU hidden size; None means Llama's rule (8/3 · dim rounded up to ``multiple_of``).
        multiple_of: rounding of the derived ``ffn_hidden``.
        max_seq_len: longest sequence (RoPE table size); None takes the data's ``seq_len``.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        tie_embeddings: share input embedding and output projection.
        position_encoding: ``rope`` or ``alibi`` (linear attention biases, as BTLM-3B-8K used).
        share_layers_every: ALBERT-style sharing: ``n_layers / k`` distinct blocks, each applied ``k``
            times in a row (1: no sharing).
        embedding_rank: low-rank factorized embeddings (V×r then r×dim); None: a full V×dim table.
        init_std: std of the normal init.
        init_scaled_residual: scale residual output projections by 1/sqrt(2 · n_layers) (GPT-2).
    """

    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    vocab_size: int | None = None
    ffn_hidden: int | None = None
    multiple_of: int = 64
    max_seq_len: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    position_encoding: str = "rope"
    share_layers_every: int = 1
    embedding_rank: int | None = None
    init_std: float = 0.02
    init_scaled_residual: bool = True

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        kv = self.kv_heads
        if self.n_heads % kv:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={kv}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for RoPE: "
                             "change model.dim or model.n_heads")
        if self.position_encoding not in ("rope", "alibi"):
            raise ValueError(f"model.position_encoding={self.position_encoding!r}: choose rope or alibi")
        if self.share_layers_every < 1 or self.n_layers % self.share_layers_every:
            raise ValueError(f"model.share_layers_every={self.share_layers_every} must be >= 1 and divide "
                             f"model.n_layers={self.n_layers}")
        if self.embedding_rank is not None and not 0 < self.embedding_rank < self.dim:
            raise ValueError(f"model.embedding_rank={self.embedding_rank}: must be in (0, model.dim={self.dim})")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(8 * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al.): a geometric sequence, interleaved for non-powers of two."""
    def pow2(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(pow2(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    return torch.tensor(pow2(closest) + pow2(2 * closest)[0::2][: n_heads - closest])


def alibi_bias(n_heads: int, seq_len: int) -> torch.Tensor:
    """(H, T, T) additive attention bias: -slope · distance on and below the diagonal, -inf above."""
    pos = torch.arange(seq_len)
    dist = (pos[None, :] - pos[:, None]).float()  # j - i, <= 0 for visible keys
    bias = alibi_slopes(n_heads)[:, None, None] * dist[None]
    return bias.masked_fill(dist[None] > 0, float("-inf"))


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's whole shape, also for a ZeRO-3 parameter built under ``zero.Init`` (an empty
    placeholder whose real shape is ``ds_shape``); a DTensor reports its global shape itself."""
    return tuple(getattr(p, "ds_shape", p.shape))


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once), whole even when sharded."""
    return sum(math.prod(full_shape(p)) for p in {id(p): p for p in model.parameters()}.values())


# Elements per independently seeded block of a parameter. A rank generates only the blocks that
# overlap its shard, so initialization costs O(shard) time and memory, not O(model).
INIT_BLOCK = 1 << 20


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _shard_offset(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(local tensor, flat offset of its first element in the full parameter)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return p, 0
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0) for pl in p.placements):
        raise NotImplementedError(f"initializing a DTensor with placements {p.placements}; "
                                  "only Shard(0)/Replicate are used here")
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = math.prod(p.shape[1:]) if p.ndim > 1 else 1
    return p.to_local(), (offset[0] if offset else 0) * row


@torch.no_grad()
def fill_param(p: torch.Tensor, name: str, seed: int, std: float | None) -> None:
    """Fill ``p`` (a full tensor or this rank's dim-0 shard of one) with N(0, std), or ones when
    ``std`` is None. Element ``i`` of the full parameter comes from block ``i // INIT_BLOCK``, drawn
    on the CPU from a generator seeded by (seed, name, block): the same value on any device, for
    any world size."""
    local, start = _shard_offset(p)
    if std is None:
        local.fill_(1.0)
        return
    n = local.numel()
    if n == 0:
        return
    flat = local.view(-1)
    pos, end = start, start + n
    while pos < end:
        block = pos // INIT_BLOCK
        lo, hi = pos - block * INIT_BLOCK, min(end - block * INIT_BLOCK, INIT_BLOCK)
        g = torch.Generator().manual_seed(_block_seed(seed, name, block))
        values = torch.randn(hi, generator=g, dtype=torch.float32)[lo:hi].mul_(std)
        flat[pos - start: pos - start + (hi - lo)].copy_(values)
        pos += hi - lo


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 (as HF Llama does) so bf16 activations keep their precision here.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim: int, seq_len: int, theta: float,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim) in the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                bias: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv != self.n_heads
        if bias is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # ALiBi: the bias already holds the causal mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# Ops whose outputs ``op`` activation checkpointing keeps: matmuls and attention, the expensive ones to
# recompute. Everything else (norms, RoPE, SiLU, products, casts) is recomputed in backward.
_SAVED_OP_NAMES = ("mm", "addmm", "bmm", "_scaled_mm", "linear", "_scaled_dot_product_flash_attention",
                   "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                   "_scaled_dot_product_flash_attention_for_cpu")
SAVED_OPS = frozenset(getattr(torch.ops.aten, name).default for name in _SAVED_OP_NAMES
                      if hasattr(torch.ops.aten, name))


def _op_ac_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


# A fresh pair of contexts per checkpointed call, as torch.utils.checkpoint's ``context_fn`` requires.
op_ac_contexts = functools.partial(create_selective_checkpoint_contexts, _op_ac_policy)


class Block(nn.Module):
    """Pre-norm transformer block. ``checkpoint`` (set by activation checkpointing; parameter names
    stay unchanged): ``none``; ``block`` recomputes all of its activations in backward; ``op`` keeps
    the outputs of matmuls and attention and recomputes the rest."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)
        self.checkpoint = "none"

    def _forward(self, x: torch.Tensor, cos, sin, bias) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                bias: torch.Tensor | None) -> torch.Tensor:
        if self.checkpoint == "none" or not torch.is_grad_enabled():
            return self._forward(x, cos, sin, bias)
        extra = {"context_fn": op_ac_contexts} if self.checkpoint == "op" else {}
        return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, bias, use_reentrant=False, **extra)


class LMHead(nn.Linear):
    """The output projection (an ``nn.Linear``: its parameter stays ``lm_head.weight``) that can also
    return the loss: with ``chunk_tokens > 0`` without ever holding the (tokens x vocab) logits.

    Call it as a module (``self.lm_head(h, targets)``) so sharding hooks on the unit that holds it fire.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.loss_kernels: ChunkKernels = EAGER_KERNELS

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None, per_sample: bool = False,
                chunk_tokens: int = 0) -> torch.Tensor:
        """Logits ``(..., V)`` without targets; else the mean fp32 loss, or ``(B,)`` per-sample means."""
        if targets is None:
            return super().forward(h)
        if chunk_tokens <= 0:
            return lm_loss(super().forward(h), targets, per_sample)
        return chunked_linear_cross_entropy(h, self.weight, targets, chunk_tokens,
                                            per_sample_groups=targets.shape[0] if per_sample else None,
                                            kernels=self.loss_kernels)


class Transformer(nn.Module):
    """Decoder-only LM. ``forward(tokens (B, T)) -> logits (B, T, V)``; ``forward(tokens, targets) -> loss``."""

    def __init__(self, cfg: ModelConfig, seed: int | None = 0) -> None:
        """Build the model; ``seed=None`` leaves the parameters uninitialized (for building on the
        meta device and initializing each shard after sharding: :meth:`init_weights`)."""
        super().__init__()
        if cfg.vocab_size is None or cfg.max_seq_len is None:
            raise ValueError("model.vocab_size and model.max_seq_len must be resolved (from the data manifest) "
                             "before building")
        self.cfg = cfg
        r = cfg.embedding_rank
        self.embed_tokens = nn.Embedding(cfg.vocab_size, r or cfg.dim)
        if r is not None:
            self.embed_proj = nn.Linear(r, cfg.dim, bias=False)  # factorized: V×r table, then r -> dim
        # With sharing, only n_layers / k distinct blocks exist; layer i runs block i // k.
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers // cfg.share_layers_every))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if r is not None and cfg.tie_embeddings:
            self.head_proj = nn.Linear(cfg.dim, r, bias=False)  # dim -> r, then the tied V×r table
        self.lm_head = LMHead(r if (r is not None and cfg.tie_embeddings) else cfg.dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Buffers are not persistent: they are derived from the config, never loaded from a checkpoint.
        for name, table in self._derived_buffers().items():
            self.register_buffer(name, table, persistent=False)
        # Tokens per chunk of the training loss (0: plain projection + cross-entropy): set_loss_chunk.
        self.loss_chunk_tokens = 0
        if seed is not None:
            self.init_weights(seed)

    def init_weights(self, seed: int) -> None:
        """Initialize every parameter (and the derived buffers) deterministically from ``seed``.

        Works on whatever each rank holds: full tensors, FSDP2's DTensor shards (after building on
        the meta device, ``fully_shard`` and ``to_empty``), or a ZeRO-3 parameter gathered for the
        call. A parameter's values depend only on (seed, its name), never on how it is sharded, so
        a 2-rank run starts from exactly the weights of a 1-process build.
        """
        self._init_buffers()
        for name, p in self.named_parameters():  # a tied weight appears once, under its first name
            self.init_param(name, p, seed)

    def init_param(self, name: str, p: torch.Tensor, seed: int) -> None:
        """Initialize parameter ``name`` (or this rank's shard of it): norms 1, residual outputs
        N(0, std/sqrt(2·layers)) (GPT-2), everything else N(0, std)."""
        std = self.cfg.init_std
        if name.endswith("layernorm.weight") or name == "norm.weight":
            fill_param(p, name, seed, std=None)
        elif name.endswith(("o_proj.weight", "down_proj.weight")) and self.cfg.init_scaled_residual:
            fill_param(p, name, seed, std=std / math.sqrt(2 * self.cfg.n_layers))
        else:
            fill_param(p, name, seed, std=std)

    def _derived_buffers(self, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """RoPE tables or the ALiBi bias: derived from the config, never loaded from a checkpoint."""
        cfg = self.cfg
        if cfg.position_encoding == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            return {"rope_cos": cos.to(device), "rope_sin": sin.to(device)}
        return {"alibi": alibi_bias(cfg.n_heads, cfg.max_seq_len).to(device)}

    def _init_buffers(self) -> None:
        """Recompute the derived buffers on the parameters' device (``to_empty`` leaves them garbage)."""
        device = next(self.parameters()).device
        for name, table in self._derived_buffers(None if device.type == "meta" else device).items():
            setattr(self, name, table)

    def tie_weights(self) -> None:
        """Share the input table with the output head (``to_empty`` gives each module its own copy)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                per_sample: bool = False) -> torch.Tensor:
        """Logits ``(B, T, V)`` of ``tokens (B, T)``; with ``targets (B, T)`` the mean fp32 loss instead
        (``(B,)`` per-sample means with ``per_sample``), over chunks of ``loss_chunk_tokens`` tokens."""
        T = tokens.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos = sin = bias = None
        if self.cfg.position_encoding == "rope":
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            bias = self.alibi[:, :T, :T]  # (H, T, T)
        h = self.embed_tokens(tokens)  # (B, T, C) or (B, T, r)
        if self.cfg.embedding_rank is not None:
            h = self.embed_proj(h)
        for i in range(self.cfg.n_layers):
            h = self.layers[i // self.cfg.share_layers_every](h, cos, sin, bias)
        h = self.norm(h)
        if hasattr(self, "head_proj"):
            h = self.head_proj(h)
        if targets is None:
            return self.lm_head(h)  # (B, T, V)
        return self.lm_head(h, targets, per_sample=per_sample, chunk_tokens=self.loss_chunk_tokens)

    def set_loss_chunk(self, tokens: int) -> None:
        """Compute the loss of ``forward(tokens, targets)`` over chunks of this many tokens, so the
        (tokens x vocab) fp32 logits never exist at once; 0: one plain projection + cross-entropy."""
        if tokens < 0:
            raise ValueError(f"loss chunk of {tokens} tokens: must be >= 0 (0: unchunked)")
        self.loss_chunk_tokens = tokens

    def set_activation_checkpointing(self, mode: str, every: int = 2) -> None:
        """``none``; ``block``: recompute every ``every``-th whole block in backward; ``op``: every block
        keeps its matmul and attention outputs and recomputes the rest (torch's selective activation
        checkpointing); ``full``: recompute every block."""
        if mode not in AC_MODES:
            raise ValueError(f"activation checkpointing mode {mode!r}: choose one of {AC_MODES}")
        if every < 1:
            raise ValueError(f"activation checkpointing every={every}: must be >= 1")
        for i, block in enumerate(self.layers):
            if mode == "block":
                block.checkpoint = "block" if i % every == 0 else "none"
            else:
                block.checkpoint = {"none": "none", "op": "op", "full": "block"}[mode]

    def compile_blocks(self, loss: bool = True) -> None:
        """``torch.compile`` each block in place (parameter names, and so checkpoints, are unchanged)
        and, with ``loss``, the per-chunk kernels of the chunked loss (the unchunked loss stays eager)."""
        for block in self.layers:
            block.compile()
        if loss:
            self.lm_head.loss_kernels = compiled_kernels()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32: one number, or one per sample (evaluation
    attributes each sample to its source)."""
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="none" if per_sample else "mean")
    return flat.view(targets.shape).mean(dim=-1) if per_sample else flat
