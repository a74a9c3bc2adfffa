"""FLOPs per token against the model's own matmuls; the GPU peak table against real device names."""
import itertools

import pytest
import torch
from torch import nn

from slimpajama_train.mfu import detect_peak_tflops, flops_per_token, mfu_off_reason, peak_tflops_for
from slimpajama_train.model import ModelConfig, Transformer

SEQ = 16
OPTIONS = list(itertools.product(
    [False, True],  # tie_embeddings
    [None, 8],  # embedding_rank
    [1, 2],  # share_layers_every
    [None, 2],  # n_kv_heads (None: multi-head, 2: GQA)
    ["rope", "alibi"],  # position_encoding
))


def _cfg(tie, rank, share, kv, pos) -> ModelConfig:
    # vocab far from dim and rank so that swapping any two of them changes the count
    return ModelConfig(dim=32, n_layers=4, n_heads=4, n_kv_heads=kv, ffn_hidden=48, vocab_size=101, max_seq_len=SEQ,
                       tie_embeddings=tie, embedding_rank=rank, share_layers_every=share, position_encoding=pos)


def _applied_matmul_params(model: nn.Module, seq_len: int) -> int:
    """Σ over nn.Linear modules of weight.numel() x the number of times one forward applies it to
    each token, counted by hooks on a real forward (a shared block is called once per use)."""
    calls: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
             for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(torch.zeros(1, seq_len, dtype=torch.long))
    for h in hooks:
        h.remove()
    linears = dict(model.named_modules())
    return sum(linears[name].weight.numel() * n for name, n in calls.items())


@pytest.mark.parametrize("tie,rank,share,kv,pos", OPTIONS, ids=[
    f"{'tied' if t else 'untied'}-r{r}-share{s}-kv{k}-{p}" for t, r, s, k, p in OPTIONS])
def test_flops_per_token_is_6x_applied_matmul_params_plus_attention(tie, rank, share, kv, pos):
    cfg = _cfg(tie, rank, share, kv, pos)
    model = Transformer(cfg)
    applied = _applied_matmul_params(model, SEQ)
    # the same count from the structure: blocks' linears run share_layers_every times, the rest once
    static = sum(m.weight.numel() * (share if name.startswith("layers.") else 1)
                 for name, m in model.named_modules() if isinstance(m, nn.Linear))
    assert applied == static
    assert flops_per_token(cfg, SEQ) == 6 * applied + 12 * cfg.n_layers * cfg.dim * SEQ


def test_flops_per_token_untied_factorized_counts_the_full_output_head():
    # 125m-class shape with a rank-128 factorized embedding, untied: the head is dim x V (24.6M
    # weights), not rank x (dim + V) as an earlier formula had it.
    cfg = ModelConfig(dim=768, n_layers=12, n_heads=12, vocab_size=32000, max_seq_len=2048, embedding_rank=128)
    per_layer = 4 * 768 * 768 + 3 * 768 * cfg.hidden_dim
    assert flops_per_token(cfg, 2048) == 6 * (12 * per_layer + 128 * 768 + 768 * 32000) + 12 * 12 * 768 * 2048


def test_flops_per_token_needs_a_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        flops_per_token(ModelConfig(), 16)


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA H800", 989.0),
    ("NVIDIA H800 PCIe", 756.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA GH200 144G HBM3e", 989.0),
    ("NVIDIA B200", 2250.0),
    ("NVIDIA B100", 1750.0),
    ("NVIDIA GB200", 2500.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A800-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", 70.0),
    ("Tesla V100-SXM2-32GB", None),
    ("Tesla T4", None),
    ("NVIDIA L40", None),
    ("NVIDIA H20", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_tflops_for_real_device_names(name, peak):
    assert peak_tflops_for(name) == peak


def test_no_peak_on_cpu_and_the_reason_names_the_override():
    cpu = torch.device("cpu")
    assert detect_peak_tflops(cpu) is None
    assert "trainer.peak_tflops" in mfu_off_reason(cpu)
