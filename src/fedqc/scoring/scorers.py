"""The forward-only scorers, computed from per-sample token-mean response losses.

ℓ(r|q) is the mean NLL of the response given the prompt, ℓ(r) the same with an empty instruction.
Each scorer declares its direction once; thresholds and filters use the *oriented* score
(direction × raw score), where higher always means better.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedqc.data.encoding import encode_all
from fedqc.data.samples import Sample
from fedqc.errors import FedqcError
from fedqc.models.likelihood import response_nll
from fedqc.models.loading import LoadedModel

HIGHER_IS_BETTER, LOWER_IS_BETTER = 1, -1


@dataclass(frozen=True)
class Scorer:
    name: str
    direction: int
    needs_bare: bool  # needs ℓ(r), the pass over the response with an empty instruction
    formula: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (ℓ(r|q), ℓ(r)) -> raw score
    description: str

    def orient(self, raw: np.ndarray) -> np.ndarray:
        return self.direction * raw

    def raw(self, oriented: float) -> float:
        return self.direction * oriented


SCORERS: dict[str, Scorer] = {
    s.name: s
    for s in [
        Scorer(
            "ppl",
            LOWER_IS_BETTER,
            False,
            lambda c, b: np.exp(c),
            "perplexity of the response given the prompt, exp ℓ(r|q)",
        ),
        Scorer(
            "cond-prob",
            HIGHER_IS_BETTER,
            False,
            lambda c, b: -c,
            "mean log-probability of the response given the prompt, −ℓ(r|q)",
        ),
        Scorer(
            "ifd",
            LOWER_IS_BETTER,
            True,
            lambda c, b: c / b,
            "instruction-following difficulty ℓ(r|q)/ℓ(r) (Cherry LLM); ≥ 1: prompt does not help",
        ),
        Scorer(
            "ira",
            HIGHER_IS_BETTER,
            True,
            lambda c, b: b - c,
            "instruction-response alignment ℓ(r) − ℓ(r|q) (FedDQC), per-token means",
        ),
    ]
}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise FedqcError(f"unknown scorer '{name}'; choose one of: {', '.join(SCORERS)}")
    return SCORERS[name]


@dataclass
class Scores:
    raw: np.ndarray
    oriented: np.ndarray
    truncated: int  # samples cut to the maximum length (scored on what was kept)


def score_samples(
    loaded: LoadedModel,
    samples: list[Sample],
    scorer: Scorer,
    max_length: int,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> Scores:
    """Score samples on the model's current adapter. ``on_batch`` gets the rows done per batch."""
    tok, pad = loaded.tokenizer, loaded.tokenizer.pad_token_id
    cond = encode_all(tok, samples, max_length)
    sums, counts = response_nll(loaded.model, cond, pad, batch_tokens, on_batch)
    cond_loss = sums / np.maximum(counts, 1)
    bare_loss = np.full_like(cond_loss, np.nan)
    if scorer.needs_bare:
        bare = encode_all(tok, samples, max_length, bare=True)
        bsums, bcounts = response_nll(loaded.model, bare, pad, batch_tokens, on_batch)
        bare_loss = bsums / np.maximum(bcounts, 1)
    with np.errstate(all="ignore"):
        raw = scorer.formula(cond_loss, bare_loss).astype(np.float64)
    return Scores(raw, scorer.orient(raw), sum(e.truncated for e in cond))
