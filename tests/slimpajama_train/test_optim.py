import math

import pytest
import torch

from slimpajama_train.model import ModelConfig, Transformer
from slimpajama_train.optim import OptimConfig, lr_at, param_groups


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1) == lr_at(500, cfg, 110)
    lrs = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_no_decay_for_norms_and_embeddings():
    m = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=50, max_seq_len=8))
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all("norm" in names[id(p)] or "embed" in names[id(p)] for p in no_decay["params"])
    assert {names[id(p)] for p in decay["params"]} >= {"lm_head.weight", "layers.0.self_attn.q_proj.weight"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_bad_values_name_the_override():
    with pytest.raises(ValueError, match="optim.lr"):
        OptimConfig(lr=0)


def test_wsd_schedule():
    cfg = OptimConfig(lr=1.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_at(5, cfg, 100) == pytest.approx(0.6)
    assert lr_at(10, cfg, 100) == lr_at(79, cfg, 100) == 1.0
    assert lr_at(80, cfg, 100) == pytest.approx(0.95) and lr_at(99, cfg, 100) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="optim.schedule"):
        OptimConfig(schedule="linear")


def test_embeddings_decay_is_configurable():
    m = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=50, max_seq_len=8, tie_embeddings=True))
    decay, _ = param_groups(m, 0.1, decay_embeddings=False)
    assert all(p is not m.embed_tokens.weight for p in decay["params"])
    decay, _ = param_groups(m, 0.1, decay_embeddings=True)
    assert any(p is m.embed_tokens.weight for p in decay["params"])


def test_fused_adamw_skips_on_device_found_inf():
    """The fused kernel (CPU as on CUDA) leaves weights, moments and the step count alone when the
    device-side found_inf flag is set: the skip decision never visits the host."""
    from slimpajama_train.optim import build_optimizer

    m = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=50, max_seq_len=8))
    opt = build_optimizer(m, OptimConfig(fused=True), torch.device("cpu"))
    assert opt.defaults["fused"]
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in m.parameters()]
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))
    assert all(float(s["step"]) == 0 for s in opt.state.values())
    opt.found_inf = torch.zeros(())
    opt.step()
    assert not all(torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))
    assert not build_optimizer(m, OptimConfig(fused=False), torch.device("cpu")).defaults["fused"]


def test_global_grad_norm_is_exact_to_fp32_rounding_on_a_large_gradient():
    """The gradient norm sums squares in fp64: torch's CPU fp32 norm kernel was 3.1e-4 off on the demo
    model's 1M-element embedding gradient, which made bitwise-identical gradients log norms 6e-5 apart
    between layouts (and clip by a slightly wrong factor)."""
    from slimpajama_train.backends.fsdp2 import global_grad_norm

    gen = torch.Generator().manual_seed(0)
    # An embedding gradient's rows scale with their tokens' counts (Zipf): a wide range of magnitudes.
    zipf_rows = torch.randn(8000, 128, generator=gen) / torch.arange(1, 8001).float()[:, None]
    grads = [zipf_rows, torch.randn(64, generator=gen) * 1e-3, torch.zeros(3)]
    exact = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    norm = global_grad_norm(grads)
    assert norm.dtype == torch.float32
    print(f"fp64-accumulated norm: rel error {abs(norm.item() - exact) / exact:.1e}; torch.nn.utils.get_total_norm: "
          f"{abs(torch.nn.utils.get_total_norm(grads).item() - exact) / exact:.1e}")
    assert abs(norm.item() - exact) / exact < 1e-7
