"""The chunked output projection + cross-entropy equals the plain one (loss and gradients) and holds far less."""
import pytest
import torch
import torch.nn.functional as F

from slimpajama_train.chunked_loss import chunked_linear_cross_entropy
from slimpajama_train.model import ModelConfig, Transformer, lm_loss
from tests.helpers.memory_probe import run_probe

N, D, V = 50, 16, 97


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.5).to(dtype).requires_grad_()
    return hidden, weight, torch.randint(0, V, (N,), generator=g)


def _loss_and_grads(fn, hidden, weight) -> tuple[torch.Tensor, ...]:
    loss = fn(hidden, weight)
    return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))


def _plain(targets: torch.Tensor):
    return lambda h, w: F.cross_entropy(F.linear(h, w).float(), targets)


@pytest.mark.parametrize("chunk", [1, 7, 16, N, 1000])  # 7 leaves a remainder; N and 1000 are one chunk
def test_loss_and_gradients_equal_the_plain_path_fp32(chunk):
    hidden, weight, targets = _inputs()
    want = _loss_and_grads(_plain(targets), hidden, weight)
    got = _loss_and_grads(lambda h, w: chunked_linear_cross_entropy(h, w, targets, chunk), hidden, weight)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ignored_targets_and_per_sample_means_match_cross_entropy():
    hidden, weight, targets = _inputs()
    t = targets[:48].clone()
    targets[::4] = -100
    want = _loss_and_grads(_plain(targets), hidden, weight)
    got = _loss_and_grads(lambda h, w: chunked_linear_cross_entropy(h, w, targets, 8), hidden, weight)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    h = hidden[:48].detach()
    per_sample = chunked_linear_cross_entropy(h.view(4, 12, D), weight.detach(), t.view(4, 12), 5, per_sample_groups=4)
    torch.testing.assert_close(per_sample, lm_loss(F.linear(h, weight.detach()).view(4, 12, V), t.view(4, 12),
                                                   per_sample=True), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_and_bf16_inputs_match_the_plain_path_in_bf16():
    hidden, weight, targets = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _loss_and_grads(_plain(targets), hidden, weight)
        got = _loss_and_grads(lambda h, w: chunked_linear_cross_entropy(h, w, targets, 7), hidden, weight)
    assert got[1].dtype == got[2].dtype == torch.float32  # gradients flow back through the casts to fp32
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
    hidden, weight, targets = _inputs(torch.bfloat16)
    want = _loss_and_grads(_plain(targets), hidden, weight)
    got = _loss_and_grads(lambda h, w: chunked_linear_cross_entropy(h, w, targets, 7), hidden, weight)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def _model_loss_and_grads(model: Transformer, x: torch.Tensor, y: torch.Tensor, chunk: int | None):
    model.zero_grad(set_to_none=True)
    if chunk is None:
        loss = lm_loss(model(x), y)
    else:
        model.set_loss_chunk(chunk)
        loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("extra", [{}, {"tie_embeddings": True}, {"tie_embeddings": True, "embedding_rank": 16}])
def test_model_forward_with_targets_equals_lm_loss_of_the_logits(extra):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32, **extra)
    model = Transformer(cfg)
    x, y = torch.randint(0, 97, (3, 32)), torch.randint(0, 97, (3, 32))
    want_loss, want_grads = _model_loss_and_grads(model, x, y, None)
    for chunk in (0, 40, 96):
        loss, grads = _model_loss_and_grads(model, x, y, chunk)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
        with torch.no_grad():
            torch.testing.assert_close(model(x, y, per_sample=True), lm_loss(model(x), y, per_sample=True),
                                       rtol=1e-5, atol=1e-6)
    assert model(x).shape == (3, 32, 97)  # without targets: logits, whatever the chunk
    with pytest.raises(ValueError, match=">= 0"):
        model.set_loss_chunk(-1)


def test_three_training_steps_give_the_same_losses_chunked_or_not():
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=32000, max_seq_len=128)
    x, y = torch.randint(0, 32000, (2, 128)), torch.randint(0, 32000, (2, 128))
    curves = {}
    for chunk in (0, 96):
        model = Transformer(cfg)
        model.set_loss_chunk(chunk)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        curves[chunk] = []
        for _ in range(3):
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            curves[chunk].append(loss.item())
    assert curves[96] == pytest.approx(curves[0], abs=1e-5)
    assert curves[0][-1] < curves[0][0]


@pytest.mark.slow
def test_chunked_loss_holds_less_than_the_fp32_logits():
    # One training step at vocab 8k, micro-batch 4 x 1024: the plain path holds the fp32 logits, their
    # log-softmax and gradients (~3 x 131 MB); the chunked one a 512-token chunk (16 MB) at a time. The
    # figures are tensor bytes, exact at any size: a 32k vocabulary and 8 x 2048 tokens (2.1 GB of
    # logits) showed the same thing in 16x the time.
    shape = ["--vocab", "8000", "--micro-batch", "4", "--seq-len", "1024", "--dim", "64", "--layers", "1",
             "--measure", "tensors"]
    plain = run_probe(*shape, "--loss-chunk", "0")
    chunked = run_probe(*shape, "--loss-chunk", "512")
    logits_bytes = 4 * 1024 * 8000 * 4
    print(f"peak MiB: unchunked {plain['peak_mib']:.0f}, chunked(512) {chunked['peak_mib']:.0f}; "
          f"fp32 logits {logits_bytes / 2**20:.0f}")
    assert plain["peak_bytes"] - chunked["peak_bytes"] >= logits_bytes
    assert chunked["losses"] == pytest.approx(plain["losses"], abs=1e-5)
