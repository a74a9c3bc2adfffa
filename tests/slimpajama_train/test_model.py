import pytest
import torch

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
