"""``slimpajama-generate``: sample text from a checkpoint.

Usage::

    slimpajama-generate runs/demo --prompt "def main(" --max-new-tokens 64 --temperature 0.8 --top-k 50 --top-p 0.95
"""
from __future__ import annotations

import argparse
import json

import sentencepiece as spm
import torch
import torch.nn.functional as F

from data_prep.cli import add_debug_flag, cli_errors
from slimpajama_train.model import Transformer
from slimpajama_train.tools.load_checkpoint import load_model


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (B, V) logits outside the top-k and outside the smallest set with cumulative probability ≥ top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(model: Transformer, tokens: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
           top_p: float = 1.0, eos_id: int | None = None, seed: int = 0) -> list[int]:
    """Autoregressive sampling; ``temperature`` 0 is greedy. Returns only the new tokens."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    seq = torch.tensor([tokens], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(seq[:, -model.cfg.max_seq_len:])[:, -1, :].float()  # (1, V)
        if temperature <= 0:
            nxt = int(logits.argmax(-1))
        else:
            probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            nxt = int(torch.multinomial(probs.cpu(), 1, generator=gen))
        if eos_id is not None and nxt == eos_id:
            break
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]], device=device)], dim=1)
    return out


def generate_text(checkpoint: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 50,
                  top_p: float = 0.95, seed: int = 0) -> str:
    """Load ``checkpoint`` and its tokenizer; return the prompt followed by the sampled continuation.

    A prompt that encodes to no tokens ("", or only what the normalizer removes) samples a document
    from its start: the context is then EOS alone, which is what training put before every document
    (documents are joined by EOS, with no BOS)."""
    model, _, ckpt = load_model(checkpoint)
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    context = sp.encode(prompt)
    if not context:
        if sp.eos_id() < 0:
            raise ValueError(f"--prompt {prompt!r} encodes to no tokens and {ckpt}/tokenizer.model has no EOS to "
                             "start from; give a prompt")
        context = [sp.eos_id()]
    ids = sample(model, context, max_new_tokens, temperature, top_k, top_p, sp.eos_id(), seed)
    return prompt + sp.decode(ids) if not prompt.endswith(" ") else prompt + sp.decode(ids).lstrip()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Sample text from a slimpajama_train checkpoint.")
    p.add_argument("checkpoint", help="checkpoint dir (step_XXXXXXXX), its checkpoints/ root, or the run dir")
    p.add_argument("--prompt", default="def ", help='text to continue; "" samples a document from its start')
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print {prompt, generated} as JSON")
    add_debug_flag(p)
    a = p.parse_args(argv)
    with cli_errors("slimpajama-generate", a.debug):
        text = generate_text(a.checkpoint, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed)
    print(json.dumps({"prompt": a.prompt, "generated": text}) if a.json else text)


if __name__ == "__main__":
    main()
