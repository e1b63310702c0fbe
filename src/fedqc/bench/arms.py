"""The arms of the experiment and what each keeps, on one federation with known flags.

- ``mixed``: no quality control, every sample is kept.
- ``oracle``: the clean samples only (an upper bound; needs the ground truth).
- ``random``: on each client, as many samples as another arm kept there, drawn at random (the
  baseline a selection method must beat at the same kept count: Ivison et al. 2025). Its draw
  depends on a seed, so it is made where the arm trains (:func:`random_keep`).
- QC, ``<scorer>/<rule>``: τ from the anchors with an anchor rule; every client keeps score ≥ τ.
  ``mixture``: as the federation does it, every client counts its scores over bins fixed from the
  anchor scores, the server sums the counts and fits the two-component model (anchors as
  known-clean points); τ where clean and corrupted are equally likely. No rate is given to it.
- ``<scorer>/drop-fraction``: each client drops its lowest-scoring fraction, equal to the true
  global corrupted proportion (paper [A]'s ablation baseline; the rate comes from the ground truth).
- ``<scorer>/global-proportion``: one τ over all clients' scores pooled, dropping the true global
  proportion. Possible only in a benchmark: an upper bound that breaks privacy (the server would
  need every client's scores) and needs the true rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedqc.quality.mixture import fit_mixture, histogram, histogram_edges
from fedqc.quality.rules import global_threshold, parse_rule
from fedqc.quality.selection import select, selection_metrics
from fedqc.scoring.scorers import CHECKPOINT_SCORERS, get_checkpoint_scorer, get_scorer

KINDS = ("mixed", "oracle", "random", "qc", "drop-fraction", "global-proportion")
UPPER_BOUNDS = {
    "oracle": "upper bound: needs the ground truth",
    "global-proportion": "upper bound: breaks privacy, needs the true rate",
    "drop-fraction": "baseline: needs the true rate",
}


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str
    scorer: str | None = None
    rule: str | None = None  # for qc arms

    @property
    def selects(self) -> bool:
        """Whether the arm's selection depends on scores (not mixed / oracle)."""
        return self.scorer is not None


def make_arms(scorers: Sequence[str], rules: Sequence[str]) -> list[Arm]:
    arms = [Arm("mixed", "mixed"), Arm("oracle", "oracle")]
    arms += [Arm(f"{s}/{r}", "qc", s, r) for s in scorers for r in rules]
    arms += [Arm(f"{s}/drop-fraction", "drop-fraction", s) for s in scorers]
    arms += [Arm(f"{s}/global-proportion", "global-proportion", s) for s in scorers]
    return arms


@dataclass
class Outcome:
    """One arm's decisions on one federation; τ on the oriented scale (higher = better)."""

    keep: list[np.ndarray]  # per client, bool per sample
    tau: float | None  # the one global τ, if the arm has one
    client_tau: list[float | None]  # per client: the τ it applied (lowest kept score if per-client)


def run_arm(
    arm: Arm,
    oriented: Sequence[np.ndarray],
    clean: Sequence[np.ndarray],
    anchor_oriented: np.ndarray,
    true_rate: float,
) -> Outcome:
    """Apply ``arm`` to per-client oriented scores (``clean`` is used by the oracle only)."""
    if arm.kind == "mixed":
        return Outcome([np.ones(len(c), dtype=bool) for c in clean], None, [None] * len(clean))
    if arm.kind == "oracle":
        return Outcome([np.asarray(c, dtype=bool) for c in clean], None, [None] * len(clean))
    if arm.kind == "qc":
        rule = parse_rule(arm.rule)
        if rule.needs_histograms:
            tau = mixture_tau(oriented, anchor_oriented)
        else:
            tau = global_threshold(rule, scorer_info(arm.scorer), anchor_oriented)
        return Outcome([select(o, tau=tau).keep for o in oriented], tau, [tau] * len(oriented))
    if arm.kind == "drop-fraction":
        keep = [_drop_lowest(o, true_rate) for o in oriented]
        taus = [_lowest_kept(o, k) for o, k in zip(oriented, keep, strict=True)]
        return Outcome(keep, None, taus)
    if arm.kind == "global-proportion":
        pooled = np.concatenate(oriented) if len(oriented) else np.zeros(0)
        keep_all = _drop_lowest(pooled, true_rate)
        tau = _lowest_kept(pooled, keep_all)
        bounds = np.cumsum([0, *(len(o) for o in oriented)])
        keep = [keep_all[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return Outcome(keep, tau, [tau] * len(oriented))
    raise ValueError(f"unknown arm kind '{arm.kind}'")


RANDOM = Arm("random", "random")


def random_keep(kept_like: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
    """Per client, a uniformly random subset of the same size as ``kept_like`` keeps there.

    The draw is seeded by ``seed`` alone (one draw per training seed), so the same seed gives the
    same subsets and different seeds are independent draws.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    keep = []
    for flags in kept_like:
        flags = np.asarray(flags, dtype=bool)
        chosen = np.zeros(len(flags), dtype=bool)
        chosen[rng.choice(len(flags), size=int(flags.sum()), replace=False)] = True
        keep.append(chosen)
    return keep


def scorer_info(name: str):
    """The scorer's direction and unit conversions (``raw``, ``orient``), whatever its kind; an
    ensemble with unit calibration (its raw score is the oriented one either way)."""
    return get_checkpoint_scorer(name) if name in CHECKPOINT_SCORERS else get_scorer(name)


def mixture_tau(oriented: Sequence[np.ndarray], anchor_oriented: np.ndarray) -> float:
    """The ``mixture`` rule's τ, computed as the federation does: bins fixed from the anchor
    scores, each client's histogram over them, the server's sum, then the fit."""
    edges = histogram_edges(anchor_oriented)
    counts = sum((histogram(o, edges) for o in oriented), np.zeros(len(edges) - 1, np.int64))
    return fit_mixture(edges, counts, anchor_oriented).tau


def _drop_lowest(oriented: np.ndarray, rate: float) -> np.ndarray:
    """Keep all but the round(rate × n) lowest finite scores (non-finite ones are dropped too).

    ``select`` drops ⌊fraction × n⌋; asking for (k + ½)/n makes that exactly k, whatever the
    rounding of the float product.
    """
    n = int(np.isfinite(oriented).sum())
    k = round(rate * n)
    return select(oriented, drop_fraction=(k + 0.5) / n if n else 0.0).keep


def _lowest_kept(oriented: np.ndarray, keep: np.ndarray) -> float | None:
    kept = np.asarray(oriented)[np.asarray(keep, dtype=bool)]
    return float(kept.min()) if kept.size else None


def outcome_metrics(outcome: Outcome, clean: Sequence[np.ndarray]) -> tuple[list[dict], dict]:
    """Selection metrics (clean = positive) per client and over the whole federation."""
    per_client = [
        {"kept": int(k.sum()), "total": len(k), **selection_metrics(k, c)}
        for k, c in zip(outcome.keep, clean, strict=True)
    ]
    keep, truth = np.concatenate(outcome.keep), np.concatenate(clean)
    overall = {"kept": int(keep.sum()), "total": len(keep), **selection_metrics(keep, truth)}
    return per_client, overall


def auc(oriented: np.ndarray, clean: np.ndarray) -> float:
    """P(a clean sample scores above a corrupted one), ties counting ½; non-finite scores lowest.

    NaN when either class is empty.
    """
    scores = np.where(np.isfinite(oriented), oriented, -np.inf)
    clean = np.asarray(clean, dtype=bool)
    good, bad = scores[clean], scores[~clean]
    if not good.size or not bad.size:
        return float("nan")
    above = (good[:, None] > bad[None, :]).sum()
    ties = (good[:, None] == bad[None, :]).sum()
    return float((above + 0.5 * ties) / (good.size * bad.size))
