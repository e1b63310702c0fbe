"""Keep/drop decisions on one client's oriented scores, and their counts (all that leaves it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Selection:
    keep: np.ndarray  # bool per sample
    rejected_below_threshold: int
    rejected_non_finite: int

    @property
    def kept(self) -> int:
        return int(self.keep.sum())


def select(
    oriented: np.ndarray, tau: float | None = None, drop_fraction: float | None = None
) -> Selection:
    """Keep finite scores ≥ τ, or (``drop_fraction``) all but the lowest fraction of scores.

    Non-finite scores (NaN, ±inf) are always rejected and counted on their own.
    """
    oriented = np.asarray(oriented, dtype=np.float64)
    finite = np.isfinite(oriented)
    if (tau is None) == (drop_fraction is None):
        raise ValueError("give exactly one of tau and drop_fraction")
    if tau is not None:
        passing = finite & (oriented >= tau)
    else:
        n_drop = int(np.floor(drop_fraction * finite.sum()))
        order = np.argsort(np.where(finite, oriented, np.inf), kind="stable")
        passing = finite.copy()
        passing[order[:n_drop]] = False
    return Selection(passing, int((finite & ~passing).sum()), int((~finite).sum()))


def selection_metrics(keep: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    """Precision, recall, F1 and accuracy of keep decisions, with clean = positive."""
    keep, clean = np.asarray(keep, bool), np.asarray(clean, bool)
    tp = int((keep & clean).sum())
    precision = tp / keep.sum() if keep.sum() else 0.0
    recall = tp / clean.sum() if clean.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = float((keep == clean).mean()) if keep.size else 0.0
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "accuracy": accuracy,
        "kept_fraction": float(keep.mean()) if keep.size else 0.0,
    }
