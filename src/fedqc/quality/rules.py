"""Threshold rules. Every rule works on oriented scores (higher = better); keep score ≥ τ.

- ``anchor-mean``: τ = mean anchor score (paper [A]'s rule).
- ``anchor-quantile:Q``: τ = the Q-quantile of the anchor scores (0 < Q < 1).
- ``fixed:V``: τ = V, given in the scorer's own units (e.g. a perplexity of 6.5).
- ``drop-fraction:P``: no global τ; each client drops its lowest-scoring fraction P (a baseline).
- ``anchor-conformal:α``: τ = the ⌊α(n+1)⌋-th smallest of the n anchor scores. If a clean sample
  is exchangeable with the anchors (drawn from the same distribution, scored by the same model),
  it falls below τ — and is rejected — with probability at most α. α < 1/(n+1) is refused.
- ``mixture``: τ where a two-component fit of the federation's score histogram (clients send
  counts over fixed bins; anchors are known-clean points) finds clean and corrupted equally
  likely; see :mod:`fedqc.quality.mixture`. Needs no contamination rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedqc.errors import FedqcError
from fedqc.scoring.scorers import Scorer

RULES = (
    "anchor-mean",
    "anchor-quantile:Q",
    "anchor-conformal:A",
    "mixture",
    "fixed:V",
    "drop-fraction:P",
)


@dataclass(frozen=True)
class Rule:
    kind: str
    value: float | None = None

    @property
    def is_global(self) -> bool:
        return self.kind != "drop-fraction"

    @property
    def needs_anchors(self) -> bool:
        return self.kind.startswith("anchor-") or self.kind == "mixture"

    @property
    def needs_histograms(self) -> bool:
        return self.kind == "mixture"

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


def parse_rule(text: str) -> Rule:
    kind, _, arg = text.strip().partition(":")
    if kind in {"anchor-mean", "mixture"} and not arg:
        return Rule(kind)
    if kind in {"anchor-quantile", "anchor-conformal", "fixed", "drop-fraction"} and arg:
        try:
            value = float(arg)
        except ValueError:
            value = math.nan
        in_range = {
            "fixed": math.isfinite(value),
            "drop-fraction": 0 <= value < 1,
            "anchor-quantile": 0 < value < 1,
            "anchor-conformal": 0 < value < 1,
        }
        if in_range[kind]:
            return Rule(kind, value)
    raise FedqcError(
        f"unknown threshold rule '{text}'; use one of: {', '.join(RULES)} "
        "(0 < Q, A < 1, 0 ≤ P < 1; e.g. anchor-conformal:0.1)"
    )


def global_threshold(
    rule: Rule, scorer: Scorer, anchor_oriented: np.ndarray | None
) -> float | None:
    """τ on the oriented scale, or None for the per-client ``drop-fraction`` rule.

    ``mixture`` needs the clients' histograms too: use :func:`fedqc.quality.mixture.fit_mixture`.
    """
    if rule.kind == "drop-fraction":
        return None
    if rule.kind == "mixture":
        raise ValueError("the mixture rule is fitted from client histograms, not anchors alone")
    if rule.kind == "fixed":
        return scorer.direction * float(rule.value)
    scores = np.asarray(anchor_oriented if anchor_oriented is not None else [], dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        raise FedqcError(f"rule '{rule}' needs anchor scores, but no anchor has a finite score")
    if rule.kind == "anchor-mean":
        return float(finite.mean())
    if rule.kind == "anchor-conformal":
        return conformal_threshold(finite, rule.value)
    return float(np.quantile(finite, rule.value))


def conformal_threshold(anchor_oriented: np.ndarray, alpha: float) -> float:
    """The ⌊α(n+1)⌋-th smallest anchor score: P(clean exchangeable sample < τ) ≤ α."""
    n = len(anchor_oriented)
    k = math.floor(alpha * (n + 1))
    if k < 1:
        need = math.ceil(1 / alpha) - 1
        raise FedqcError(
            f"anchor-conformal:{alpha:g} needs at least {need} anchors with finite scores, "
            f"but has {n}; use α ≥ {1 / (n + 1):.3f} or add anchors"
        )
    return float(np.sort(anchor_oriented)[k - 1])
