"""Threshold rules. Every rule works on oriented scores (higher = better); keep score ≥ τ.

- ``anchor-mean``: τ = mean anchor score (paper [A]'s rule).
- ``anchor-quantile:Q``: τ = the Q-quantile of the anchor scores (0 < Q < 1).
- ``fixed:V``: τ = V, given in the scorer's own units (e.g. a perplexity of 6.5).
- ``drop-fraction:P``: no global τ; each client drops its lowest-scoring fraction P (a baseline).
- ``anchor-conformal:α``: τ = the ⌊α(n+1)⌋-th smallest of the n anchor scores. If a clean sample
  is exchangeable with the anchors (drawn from the same distribution, scored by the same model),
  it falls below τ — and is rejected — with probability at most α, on average over anchor draws.
  That needs a score function fixed before the anchors are seen: an ensemble standardised on the
  same anchors, or demonstration anchors scored with another prefix, make it approximate
  (``fedqc bench --draws`` measures by how much). α < 1/(n+1) is refused.
- ``anchor-gaussian:α``: τ = m − t(1−α; n−1) · s · √(1 + 1/n), the one-sided 1−α lower prediction
  bound of a normal sample (m, s: the n anchor scores' mean and standard deviation; t: Student's t
  quantile). If the anchors' and clean samples' scores are independent draws of one normal
  distribution, a clean sample is rejected with probability exactly α. It uses every anchor, not
  one order statistic, so τ varies less from one anchor draw to the next; the price is the
  normality assumption. Needs n ≥ 2.
- ``mixture``: τ where a two-component fit of the federation's score histogram (clients send
  counts over fixed bins; anchors are known-clean points) finds clean and corrupted equally
  likely; see :mod:`fedqc.quality.mixture`. Needs no contamination rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

from fedqc.errors import FedqcError
from fedqc.scoring.scorers import Scorer

RULES = (
    "anchor-mean",
    "anchor-quantile:Q",
    "anchor-conformal:A",
    "anchor-gaussian:A",
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
    if kind in {"anchor-quantile", "anchor-conformal", "anchor-gaussian", "fixed", "drop-fraction"}:
        try:
            value = float(arg)
        except ValueError:
            value = math.nan
        in_range = {
            "fixed": math.isfinite(value),
            "drop-fraction": 0 <= value < 1,
            "anchor-quantile": 0 < value < 1,
            "anchor-conformal": 0 < value < 1,
            "anchor-gaussian": 0 < value < 1,
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
    if rule.kind == "anchor-gaussian":
        return gaussian_threshold(finite, rule.value)
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


def gaussian_threshold(anchor_oriented: np.ndarray, alpha: float) -> float:
    """m − t(1−α; n−1)·s·√(1+1/n): P(clean sample < τ) = α if all scores are i.i.d. normal."""
    n = len(anchor_oriented)
    if n < 2:
        raise FedqcError(
            f"anchor-gaussian:{alpha:g} needs at least 2 anchors with finite scores, but has {n}"
        )
    spread = float(np.std(anchor_oriented, ddof=1)) * math.sqrt(1 + 1 / n)
    return float(np.mean(anchor_oriented)) - float(student_t.ppf(1 - alpha, n - 1)) * spread


def guarantee(rule: Rule, anchor_oriented: np.ndarray | None) -> str:
    """What τ promises about clean samples, and under which assumption: one line for people.

    ``anchor_oriented``: the anchor scores τ came from; those with finite scores are counted.
    """
    a = rule.value
    scores = np.asarray(anchor_oriented if anchor_oriented is not None else [], dtype=np.float64)
    n_anchors = int(np.isfinite(scores).sum())
    caveat = (
        "; on average over anchor draws, and approximate when the score depends on these anchors "
        "(an ensemble standardised on them, demonstrations among them: fedqc run's default); "
        "measured in docs/choosing.md"
    )
    if rule.kind == "anchor-conformal":
        # the finite-sample bound for these anchors: τ is the k-th smallest of n, k = ⌊α(n+1)⌋
        k, ranks = math.floor(a * (n_anchors + 1)), n_anchors + 1
        return (
            f"a clean sample exchangeable with the {n_anchors} anchors (same distribution, same "
            f"model) is rejected with probability at most {k}/{ranks} = {k / ranks:.3g} (≤ {a:g})"
            + caveat
        )
    if rule.kind == "anchor-gaussian":
        return (
            f"if the {n_anchors} anchors' and the clean samples' scores are independent draws of "
            f"one normal distribution, a clean sample is rejected with probability {a:g}" + caveat
        )
    if rule.kind == "anchor-quantile":
        return f"about {a:g} of clean samples that look like the anchors are rejected (no bound)"
    if rule.kind == "anchor-mean":
        return (
            "the paper's rule, τ = the anchors' mean score: about half of clean samples that look "
            "like the anchors fall below τ if their scores are symmetric about it (no bound)"
        )
    if rule.kind == "mixture":
        return (
            "τ where the two-component fit of the federation's scores finds clean and corrupted "
            "equally likely (no bound)"
        )
    if rule.kind == "drop-fraction":
        return f"each client drops its lowest-scoring {a:g} of samples, corrupted or not"
    return f"a fixed τ = {a:g}, given in the scorer's units (no promise about clean samples)"
