"""The model's causal attention in bf16 runs a fused kernel (FlashAttention or cuDNN), not the
memory-efficient or the math fallback, at head dims 64 and 128: checked by which ATen op
``scaled_dot_product_attention`` dispatched to (profiler), in forward and backward, both for fp32
weights under autocast (one process, unwrapped) and for bf16 weights (FSDP2's param_dtype)."""
import pytest
import torch

pytestmark = pytest.mark.gpu

FUSED = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention")
FALLBACK = ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_attention_math")


def _attention_ops(model, tokens: torch.Tensor, autocast: bool) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens)
        logits.float().square().mean().backward()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(12, 12, 64), (16, 16, 128), (16, 4, 128)],
                         ids=["hd64", "hd128", "hd128_gqa"])
@pytest.mark.parametrize("weights", ["fp32_autocast", "bf16"])
def test_sdpa_selects_flash_or_cudnn(heads, kv_heads, head_dim, weights, record):
    from slimpajama_train.model import ModelConfig, Transformer

    seq = 2048
    cfg = ModelConfig(dim=heads * head_dim, n_layers=1, n_heads=heads, n_kv_heads=kv_heads, vocab_size=1024,
                      max_seq_len=seq)
    model = Transformer(cfg, seed=0).cuda()
    if weights == "bf16":
        model = model.to(torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq), device="cuda")
    _attention_ops(model, tokens, weights != "bf16")  # warm-up (first-call kernel selection and caches)
    ops = _attention_ops(model, tokens, weights != "bf16")
    fused = sorted(op for op in ops if any(f in op for f in FUSED))
    record(device=torch.cuda.get_device_name(), ops=sorted(ops))
    assert fused, f"bf16 causal attention at head dim {head_dim} ran {sorted(ops)}, not flash or cuDNN"
    assert not any(f in op for op in ops for f in FALLBACK), sorted(ops)
