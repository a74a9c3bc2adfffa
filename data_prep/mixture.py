"""Source mixture: how many times each (post-dedup) source is repeated or subsampled.

A source's factor ``f`` means: every document ``floor(f)`` times, plus once more a seeded subsample
of whole documents holding ``f - floor(f)`` of its tokens (downsampling is the case ``f < 1``).
Factors come either from explicit ``weights`` or from target ``proportions`` of the training
tokens, computed from the post-dedup token counts:

- ``total_tokens`` set: the training stream has that many tokens, ``proportions[s]`` of them from
  source ``s`` (sources above their size are repeated, the others subsampled);
- ``total_tokens`` unset: the largest total that repeats nothing (the scarcest source relative to
  its target proportion is used once, the others are subsampled).

``max_epochs`` is only a cap: a total, proportion or weight that would need a source repeated more
often raises an error naming the source, or with ``allow_shortfall`` that source is capped and the
shortfall is reported. Presets live in ``conf/prep_mixture/`` (SlimPajama, SlimPajama-DC DC-1 ... DC-6).
"""
from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from data_prep.text_hash import hash_fraction


@dataclass
class MixtureConfig:
    """Attributes:
    preset: name of the ``prep_mixture`` option this came from (informational).
    weights: source -> repeat factor (e.g. 2.5 or 0.3); unlisted sources get 1.
    proportions: source -> target fraction of training tokens; unlisted sources are left out.
        Mutually exclusive with ``weights``.
    total_tokens: size of the training stream in tokens (with ``proportions`` only); default: the
        largest total that needs no repetition.
    max_epochs: cap on the factor of any source: a mixture that would need more raises an error
        (see ``allow_shortfall``).
    allow_shortfall: instead of the error, cap such sources at ``max_epochs`` and report the
        shortfall (the total and the proportions then fall short of the targets).
    seed: seeds the fractional subsample.
    """

    preset: str = "none"
    weights: dict[str, float] = field(default_factory=dict)
    proportions: dict[str, float] = field(default_factory=dict)
    total_tokens: float | None = None
    max_epochs: float = 4.0
    allow_shortfall: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weights and self.proportions:
            raise ValueError("prep.mixture: set weights or proportions, not both")
        if any(v < 0 for v in self.weights.values()) or any(v < 0 for v in self.proportions.values()):
            raise ValueError("prep.mixture: weights and proportions must be >= 0")
        if self.proportions and not math.isclose(sum(self.proportions.values()), 1.0, abs_tol=0.02):
            raise ValueError(f"prep.mixture.proportions sum to {sum(self.proportions.values()):.3f}, expected 1")
        if self.max_epochs < 1:
            raise ValueError(f"prep.mixture.max_epochs={self.max_epochs}: must be >= 1 (every source may be used once)")
        if self.total_tokens is not None:
            if not self.proportions:
                raise ValueError("prep.mixture.total_tokens needs mixture.proportions (or a prep_mixture= preset)")
            if not self.total_tokens > 0:
                raise ValueError(f"prep.mixture.total_tokens={self.total_tokens}: must be > 0")


def check_sources(cfg: MixtureConfig, known: Iterable[str], where: str = "prep.mixture") -> None:
    """Raise ``ValueError`` when ``weights`` or ``proportions`` name a source the corpus does not have
    (a misspelt source would otherwise silently get weight 1, or its share go to the others): the
    message names each unknown source, the nearest known one, and every source of the corpus."""
    known = sorted(set(known))
    bad = [(kind, name) for kind, table in (("weights", cfg.weights), ("proportions", cfg.proportions))
           for name in table if name not in known]
    if not bad:
        return
    preset = f" (prep_mixture={cfg.preset})" if cfg.preset not in ("none", "") else ""

    def nearest(name: str) -> str:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        return f"did you mean {close[0]!r}?" if close else "no similar name"

    unknown = "; ".join(f"{where}.{kind}.{name}: no such source, {nearest(name)}" for kind, name in bad)
    raise ValueError(f"{unknown}{preset}\n  the corpus's sources are: {', '.join(known) or '(none)'}; "
                     "fix the name, or drop it (Hydra: '~mixture.proportions.<name>')")


def _snap(f: float) -> float:
    """Round away float noise next to a whole number (natural proportions give exactly 1.0)."""
    r = round(f)
    return float(r) if abs(f - r) <= 1e-9 * max(1.0, abs(f)) else f


def source_factors(cfg: MixtureConfig, tokens: dict[str, int], unit: str = "tokens") -> dict[str, float]:
    """Repeat factor per source from the post-dedup token counts ``tokens``.

    With proportions ``p_s`` (renormalized over the sources present) and total ``X``:
    ``f_s = p_s * X / T_s``; ``X`` is ``total_tokens``, or when that is unset ``min_s T_s / p_s``
    (no source repeated). A factor above ``max_epochs`` raises ``ValueError`` unless
    ``allow_shortfall``, which caps it and prints the shortfall. ``unit`` names what ``tokens``
    counts in messages (the tokenizer stage passes byte counts).
    """
    if cfg.proportions:
        present = {s: p for s, p in cfg.proportions.items() if p > 0 and tokens.get(s, 0) > 0}
        if not present:
            raise ValueError(f"prep.mixture.proportions name none of the sources found: {sorted(tokens)}")
        norm = sum(present.values())
        p = {s: v / norm for s, v in present.items()}
        total = float(cfg.total_tokens) if cfg.total_tokens is not None else min(tokens[s] / p[s] for s in p)
        want = {s: _snap(p[s] * total / tokens[s]) if s in p else 0.0 for s in tokens}
        target = {s: p[s] * total for s in p}
    else:
        want = {s: float(cfg.weights.get(s, 1.0)) for s in tokens}
        target = {s: want[s] * tokens[s] for s in tokens}
    over = sorted(s for s, f in want.items() if f > cfg.max_epochs * (1 + 1e-9))
    if not over:
        return want
    lines = [f"{s}: {tokens[s]:,} {unit} after dedup, the target of {target[s]:,.0f} needs factor {want[s]:.4g} "
             f"(> max_epochs={cfg.max_epochs:g})" for s in over]
    hint = ""
    if cfg.proportions:
        feasible = min(cfg.max_epochs * tokens[s] / p[s] for s in p)
        hint = f"; mixture.total_tokens <= {feasible:,.0f} {unit} fits these proportions"
    if not cfg.allow_shortfall:
        raise ValueError("prep.mixture: sources would be repeated more than max_epochs: " + "; ".join(lines)
                         + f". Lower mixture.total_tokens or the proportions, raise mixture.max_epochs{hint}, "
                         "or set mixture.allow_shortfall=true to cap them")
    capped = {s: min(f, cfg.max_epochs) for s, f in want.items()}
    short = sum(target[s] - cfg.max_epochs * tokens[s] for s in over)
    print(f"mixture: shortfall of {short:,.0f} {unit} (allow_shortfall=true; capped at max_epochs): "
          + "; ".join(lines), file=sys.stderr)
    return capped


def mixture_draw(doc_id: str, seed: int) -> float:
    """The seeded uniform draw that orders a document in its source's fractional subsample."""
    return hash_fraction(f"{seed}:{doc_id}")


def mixture_draws(doc_ids: list[str], seed: int) -> np.ndarray:
    return np.fromiter((mixture_draw(i, seed) for i in doc_ids), float, len(doc_ids))


def copies(draws: np.ndarray, factor: float, tokens: np.ndarray | list[int] | None = None) -> np.ndarray:
    """Copies of each document for a source factor: ``floor(f)`` plus one for a seeded ``frac(f)`` subsample.

    ``draws`` are the documents' :func:`mixture_draw` values (computed where the ids are at hand, in
    the parallel tokenize stage). The subsample walks the documents in the order of their draws and takes each one
    that brings it closer to ``frac(f)`` of the source's ``tokens`` (per document; default 1 each,
    i.e. a fraction of the documents), so a source lands on its target up to about one document,
    whatever the spread of document lengths (only documents longer than twice what is still
    missing are passed over, near the end).
    """
    whole = int(math.floor(factor))
    frac = factor - whole
    n = len(draws)
    out = np.full(n, whole, np.int64)
    if frac > 0 and n:
        w = np.ones(n, np.float64) if tokens is None else np.asarray(tokens, np.float64)
        rest = np.argsort(draws, kind="stable")
        left = frac * w.sum()  # tokens still missing
        # Vectorized form of: for d in hash order, take d if w[d] < 2 * left (it reduces the error).
        while left > 0 and len(rest):
            cand = rest[w[rest] < 2 * left]
            if not len(cand):
                break
            cum = np.cumsum(w[cand])
            m = int(np.searchsorted(cum, left, side="right"))  # these all fit
            out[cand[:m]] += 1
            left -= cum[m - 1] if m else 0.0
            if m == len(cand):
                break
            nxt = cand[m]  # overshoots: taken when that still gets closer (and then nothing more does)
            if w[nxt] < 2 * left:
                out[nxt] += 1
                break
            rest = cand[m + 1:]
    return out


def realized(tokens_per_source: dict[str, int]) -> dict[str, float]:
    """Fractions of tokens per source."""
    total = sum(tokens_per_source.values())
    return {s: round(v / total, 6) for s, v in sorted(tokens_per_source.items())} if total else {}
