import torch

from slimpajama_train.tools.generate import filter_logits


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    out = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isinf(out[0, [0, 2]]).all() and torch.equal(out[0, [1, 3]], logits[0, [1, 3]])


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_logits(probs.log(), top_k=0, top_p=0.7)
    kept = ~torch.isinf(out[0])
    assert kept.tolist() == [True, True, False, False]
    # order of the vocabulary does not matter
    out2 = filter_logits(probs.log()[:, [3, 1, 0, 2]], top_k=0, top_p=0.7)
    assert (~torch.isinf(out2[0])).tolist() == [False, True, True, False]
