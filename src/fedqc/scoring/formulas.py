"""The forward-only scorers' formulas, from per-sample token-mean response losses.

ℓ(r|q) is the mean NLL of the response given the prompt, ℓ(r) the same with an empty instruction,
and ℓ_end the NLL of the end-of-sequence token after the response (from the same pass as ℓ(r|q)).
Each scorer declares its direction once; thresholds and filters use the *oriented* score
(direction × raw score), where higher always means better.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

HIGHER_IS_BETTER, LOWER_IS_BETTER = 1, -1
# Ensemble scorer names start with one of these (``fedqc.scoring.ensemble``: mean, minimum).
ENSEMBLE_PREFIXES = ("ensemble:", "ensemble-min:")


def _needs_end(end: np.ndarray | None) -> np.ndarray:
    if end is None:
        raise ValueError("end-loss needs the end-of-sequence NLL (response_losses)")
    return end


@dataclass(frozen=True)
class Directed:
    """A scorer's name and direction: its raw and its oriented (higher is better) scores."""

    name: str
    direction: int

    def orient(self, raw: np.ndarray) -> np.ndarray:
        return self.direction * raw

    def raw(self, oriented: float) -> float:
        return self.direction * oriented


@dataclass(frozen=True)
class Scorer(Directed):
    needs_bare: bool  # needs ℓ(r), the pass over the response with an empty instruction
    formula: Callable[..., np.ndarray]  # (ℓ(r|q), ℓ(r), ℓ_end) -> raw score
    description: str
    calibration: list[float] | None = None  # ensembles: the anchors' (center, scale) per part


def by_name(scorers: list) -> dict:
    """A registry of scorers by name."""
    return {s.name: s for s in scorers}


SCORERS: dict[str, Scorer] = by_name(
    [
        Scorer(
            "ppl",
            LOWER_IS_BETTER,
            False,
            lambda c, b, e=None: np.exp(c),
            "perplexity of the response given the prompt, exp ℓ(r|q)",
        ),
        Scorer(
            "cond-prob",
            HIGHER_IS_BETTER,
            False,
            lambda c, b, e=None: -c,
            "mean log-probability of the response given the prompt, −ℓ(r|q)",
        ),
        Scorer(
            "ifd",
            LOWER_IS_BETTER,
            True,
            lambda c, b, e=None: c / b,
            "instruction-following difficulty ℓ(r|q)/ℓ(r) (Cherry LLM); ≥ 1: prompt does not help",
        ),
        Scorer(
            "ira",
            HIGHER_IS_BETTER,
            True,
            lambda c, b, e=None: b - c,
            "instruction-response alignment ℓ(r) − ℓ(r|q) (FedDQC), per-token means",
        ),
        Scorer(
            "end-loss",
            LOWER_IS_BETTER,
            False,
            lambda c, b, e=None: _needs_end(e),
            "NLL of the end-of-sequence token after the response: high where it stops mid-way "
            "(cut); NaN for a truncated sample",
        ),
    ]
)
