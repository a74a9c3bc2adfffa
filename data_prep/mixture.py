"""Source mixture: how many times each (post-dedup) source is repeated or subsampled.

A source's factor ``f`` means: every document ``floor(f)`` times, plus a seeded subsample of
``f - floor(f)`` of its documents once more (whole documents; downsampling is the case ``f < 1``).
Factors come either from explicit ``weights`` or from target ``proportions`` of the training
tokens, computed from the post-dedup token counts and capped at ``max_epochs`` per source.
Presets live in ``conf/prep_mixture/`` (SlimPajama, SlimPajama-DC DC-1 ... DC-6).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from data_prep.document import hash_fraction


@dataclass
class MixtureConfig:
    """Attributes:
    preset: name of the ``prep_mixture`` option this came from (informational).
    weights: source -> repeat factor (e.g. 2.5 or 0.3); unlisted sources get 1.
    proportions: source -> target fraction of training tokens; unlisted sources are left out.
        Mutually exclusive with ``weights``.
    max_epochs: cap on the factor of any source (proportions that would need more are not met,
        and the report says so).
    seed: seeds the fractional subsample.
    """

    preset: str = "none"
    weights: dict[str, float] = field(default_factory=dict)
    proportions: dict[str, float] = field(default_factory=dict)
    max_epochs: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weights and self.proportions:
            raise ValueError("prep.mixture: set weights or proportions, not both")
        if any(v < 0 for v in self.weights.values()) or any(v < 0 for v in self.proportions.values()):
            raise ValueError("prep.mixture: weights and proportions must be >= 0")
        if self.proportions and not math.isclose(sum(self.proportions.values()), 1.0, abs_tol=0.02):
            raise ValueError(f"prep.mixture.proportions sum to {sum(self.proportions.values()):.3f}, expected 1")
        if self.max_epochs <= 0:
            raise ValueError(f"prep.mixture.max_epochs={self.max_epochs}: must be > 0")


def source_factors(cfg: MixtureConfig, tokens: dict[str, int]) -> dict[str, float]:
    """Repeat factor per source from the post-dedup token counts ``tokens``.

    With proportions ``p_s``: the total is the largest ``X`` with ``p_s * X <= max_epochs * T_s`` for
    every source (no source is repeated more than the cap), and ``f_s = p_s * X / T_s``.
    """
    if cfg.proportions:
        present = {s: p for s, p in cfg.proportions.items() if p > 0 and tokens.get(s, 0) > 0}
        if not present:
            raise ValueError(f"prep.mixture.proportions name none of the sources found: {sorted(tokens)}")
        norm = sum(present.values())
        p = {s: v / norm for s, v in present.items()}
        total = min(cfg.max_epochs * tokens[s] / p[s] for s in p)
        return {s: (p[s] * total / tokens[s] if s in p else 0.0) for s in tokens}
    return {s: min(float(cfg.weights.get(s, 1.0)), cfg.max_epochs) for s in tokens}


def copies(doc_ids: list[str], factor: float, seed: int) -> np.ndarray:
    """Copies of each document for a source factor: ``floor(f)`` plus one for a seeded ``frac(f)`` subsample."""
    whole = int(math.floor(factor))
    frac = factor - whole
    out = np.full(len(doc_ids), whole, np.int64)
    if frac > 0:
        u = np.fromiter((hash_fraction(f"{seed}:{i}") for i in doc_ids), float, len(doc_ids))
        out += (u < frac).astype(np.int64)
    return out


def realized(tokens_per_source: dict[str, int]) -> dict[str, float]:
    """Fractions of tokens per source."""
    total = sum(tokens_per_source.values())
    return {s: round(v / total, 6) for s, v in sorted(tokens_per_source.items())} if total else {}
