import pytest
import torch

from slimpajama_train.backends.hardware import compile_problem
from slimpajama_train.model import ModelConfig, Transformer, count_parameters, lm_loss


def tiny(**kw):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("kv", [None, 1, 2, 4])
def test_shapes_and_finite_loss(kv):
    torch.manual_seed(0)
    m = Transformer(tiny(n_kv_heads=kv))
    x = torch.randint(0, 97, (3, 32))
    logits = m(x)
    assert logits.shape == (3, 32, 97)
    loss = lm_loss(logits, x)
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


def test_causality_later_tokens_never_change_earlier_logits():
    torch.manual_seed(0)
    m = Transformer(tiny()).eval()
    x = torch.randint(0, 97, (2, 32))
    y = x.clone()
    y[:, 20:] = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_tied_embeddings_share_one_tensor_and_count_once():
    untied, tied = Transformer(tiny()), Transformer(tiny(tie_embeddings=True))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert count_parameters(untied) - count_parameters(tied) == 97 * 64


def test_gqa_has_fewer_kv_parameters():
    mha, gqa = Transformer(tiny(n_kv_heads=4)), Transformer(tiny(n_kv_heads=1))
    assert gqa.layers[0].self_attn.k_proj.weight.shape == (16, 64)
    assert count_parameters(mha) > count_parameters(gqa)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.n_heads"):
        ModelConfig(dim=65, n_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(tiny())(torch.zeros(1, 33, dtype=torch.long))


def test_alibi_bias_slopes_and_causality():
    from slimpajama_train.model import alibi_bias, alibi_slopes

    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)])
    assert len(alibi_slopes(12)) == 12
    b = alibi_bias(2, 4)
    assert b[0, 3, 1] == pytest.approx(-0.0625 * 2) and torch.isinf(b[0, 1, 2]) and b[1, 2, 2] == 0
    torch.manual_seed(0)
    m = Transformer(tiny(position_encoding="alibi")).eval()
    x = torch.randint(0, 97, (2, 32))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 97
    with torch.no_grad():
        assert torch.equal(m(x)[:, :10], m(y)[:, :10])


def test_layer_sharing_reuses_blocks():
    shared, full = Transformer(tiny(n_layers=4, share_layers_every=2)), Transformer(tiny(n_layers=4))
    assert len(shared.layers) == 2 and len(full.layers) == 4
    per_block = sum(p.numel() for p in full.layers[0].parameters())
    assert count_parameters(full) - count_parameters(shared) == 2 * per_block
    assert shared(torch.randint(0, 97, (1, 8))).shape == (1, 8, 97)
    with pytest.raises(ValueError, match="share_layers_every"):
        ModelConfig(n_layers=4, share_layers_every=3)


def test_factorized_embeddings():
    fact = Transformer(tiny(embedding_rank=16, tie_embeddings=True))
    assert fact.embed_tokens.weight.shape == (97, 16) and fact.lm_head.weight is fact.embed_tokens.weight
    assert count_parameters(fact) < count_parameters(Transformer(tiny(tie_embeddings=True)))
    assert fact(torch.randint(0, 97, (1, 8))).shape == (1, 8, 97)
    untied = Transformer(tiny(embedding_rank=16))
    assert untied.lm_head.weight.shape == (97, 64)


def test_flops_per_token_formula():
    from slimpajama_train.mfu import flops_per_token

    cfg = tiny(n_kv_heads=4, ffn_hidden=128)
    per_layer = 4 * 64 * 64 + 3 * 64 * 128
    assert flops_per_token(cfg, 32) == 6 * (2 * per_layer + 64 * 97) + 12 * 2 * 64 * 32
    # matmul parameters = all parameters but embeddings and norms, for an untied model
    m = Transformer(cfg)
    matmul = sum(p.numel() for n, p in m.named_parameters() if p.ndim == 2 and not n.startswith("embed"))
    assert flops_per_token(cfg, 32) == 6 * matmul + 12 * 2 * 64 * 32


def test_initialization_is_configurable():
    torch.manual_seed(0)
    a = Transformer(tiny(init_std=0.02))
    torch.manual_seed(0)
    b = Transformer(tiny(init_std=0.02, init_scaled_residual=False))
    assert a.layers[0].mlp.down_proj.weight.std().item() < 0.7 * b.layers[0].mlp.down_proj.weight.std().item()
    assert b.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_lm_head_stays_a_linear_named_lm_head_weight():
    m = Transformer(tiny())
    assert isinstance(m.lm_head, torch.nn.Linear) and m.lm_head.bias is None
    assert "lm_head.weight" in m.state_dict()
    h = torch.randn(2, 5, 64)
    assert torch.equal(m.lm_head(h), torch.nn.functional.linear(h, m.lm_head.weight))


NO_COMPILE = compile_problem(torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.skipif(NO_COMPILE is not None, reason=NO_COMPILE or "")
def test_compiled_blocks_and_loss_match_eager():
    cfg = tiny(n_layers=1, dim=32, n_heads=2, n_kv_heads=None)
    eager, compiled = Transformer(cfg), Transformer(cfg)
    compiled.compile_blocks()
    assert compiled.lm_head.loss_kernels is not eager.lm_head.loss_kernels  # the chunk kernels compiled too
    names = [n for n, _ in eager.named_parameters()]
    assert [n for n, _ in compiled.named_parameters()] == names  # checkpoints load either way
    x, y = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    for model in (eager, compiled):
        model.set_loss_chunk(32)  # two equal chunks: one compiled shape
        model(x, y).backward()
    torch.testing.assert_close(compiled(x, y), eager(x, y), rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5, msg=name)
