"""Our Transformer and SentencePiece tokenizer behind the lm-evaluation-harness ``LM`` interface.

lm-eval asks three questions of a model: the log-probability of a continuation given a context
(``loglikelihood``, what multiple-choice tasks use), the log-probability of a whole text
(``loglikelihood_rolling``, perplexity tasks) and a greedy generation (``generate_until``). All three
run on our own forward pass, so a score measures the checkpoint, not a re-implementation of it.
"""
from __future__ import annotations

from typing import Any

import sentencepiece as spm
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from slimpajama_train.model import Transformer

# (request key, context ids, continuation ids): what TemplateLM.loglikelihood hands to _loglikelihood_tokens.
TokenRequest = tuple[Any, list[int], list[int]]


class SlimPajamaLM(TemplateLM):
    """lm-eval model over a loaded :class:`Transformer` (in eval mode) and its tokenizer.

    Context/continuation splitting is TemplateLM's, the harness's standard for causal models: the
    pair is encoded whole and split after the context's tokens (trailing spaces of the context move
    to the continuation), so SentencePiece's word-initial ``▁`` falls where it does in running text.
    An empty context is conditioned on EOS, because prep joins documents with EOS and no BOS.
    """

    def __init__(self, model: Transformer, tokenizer: spm.SentencePieceProcessor, batch_size: int = 16,
                 device: str | torch.device | None = None, max_gen_toks: int = 256) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"--batch-size={batch_size}: must be >= 1")
        self._device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self._device).eval()
        self.sp = tokenizer
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks

    # ---- what TemplateLM needs ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.sp.eos_id()

    @property
    def max_length(self) -> int:
        return int(self.model.cfg.max_seq_len)

    @property
    def tokenizer_name(self) -> str:
        return "sentencepiece"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # Training data carries no BOS, so there is nothing special to add either way.
        return list(self.sp.encode(string))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.sp.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request.

        Requests are batched longest first (similar lengths share a batch, so little padding) and
        right-padded: with causal attention, padding after a sequence cannot change its logits.
        """
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            seqs, conts = [], []
            for i in idx:
                _, ctx, cont = requests[i]
                if not 0 < len(cont) <= self.max_length:
                    raise ValueError(f"request {requests[i][0]!r}: continuation of {len(cont)} tokens; the model "
                                     f"scores 1 to {self.max_length} (model.max_seq_len)")
                # The last token is only a target; keep at most max_length inputs, dropping context on the left.
                seqs.append((ctx + cont)[-(self.max_length + 1):-1])
                conts.append(cont)
            T = max(len(s) for s in seqs)
            inputs = torch.zeros(len(seqs), T, dtype=torch.long)
            for b, s in enumerate(seqs):
                inputs[b, :len(s)] = torch.tensor(s)
            logprobs = F.log_softmax(self.model(inputs.to(self.device)).float(), dim=-1)  # (B, T, V)
            for b, i in enumerate(idx):
                n, end = len(conts[b]), len(seqs[b])
                lp = logprobs[b, end - n:end]  # (n, V): the positions that predict the continuation
                target = torch.tensor(conts[b], device=self.device)
                total = float(lp.gather(-1, target[:, None]).sum())
                out[i] = (total, bool((lp.argmax(-1) == target).all()))
                if requests[i][0] is not None:  # lm-eval's --use_cache records answers by request text
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-probability of each whole text, in windows of ``max_length`` (each token scored once,
        with as much preceding context as fits), the first token conditioned on EOS."""
        windows: list[TokenRequest] = []
        owner: list[int] = []
        for r, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.eot_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[r] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding, one request at a time, until a stop string, EOS or ``max_gen_toks``.

        Sampling options in a task's ``generation_kwargs`` are ignored: harness tasks score greedy output.
        """
        results = []
        for req in requests:
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            seq = self.tok_encode(context) or [self.eot_token_id]
            # Decoded with the context, then the context's text cut off: decoding the new tokens alone
            # would drop the space SentencePiece keeps in a word-initial "▁".
            prefix = len(self.tok_decode(seq))
            text = ""
            for _ in range(max_new):
                window = torch.tensor([seq[-self.max_length:]], device=self.device)
                nxt = int(self.model(window)[0, -1].argmax())
                if nxt == self.eot_token_id:
                    break
                seq.append(nxt)
                text = self.tok_decode(seq)[prefix:]
                if any(s and s in text for s in until):
                    break
            for s in until:  # cut at the first stop string, as the harness's own models do
                if s:
                    text = text.split(s)[0]
            self.cache_hook.add_partial("generate_until", req.args, text)
            results.append(text)
        return results

    def get_model_info(self) -> dict[str, Any]:
        """Recorded by simple_evaluate under ``config``."""
        cfg = self.model.cfg
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dim": cfg.dim, "model_n_layers": cfg.n_layers, "max_length": self.max_length,
                "vocab_size": cfg.vocab_size}
