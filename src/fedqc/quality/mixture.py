"""The ``mixture`` threshold: a two-component model of the federation's score distribution.

Clients report only histogram counts over bins the server fixes in advance; the anchors enter as
known-clean points. The server fits two Gaussians (clean, corrupted) to the binned scores by EM,
with the anchors tied to the clean component, and sets τ where a sample is as likely clean as
corrupted. No contamination rate is given to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedqc.errors import FedqcError

NUM_BINS = 64


def histogram_edges(anchor_oriented: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """Fixed bin edges from the anchors: wide below them (where corrupted samples fall), narrow
    above; values outside the edges are counted in the first or last bin.

    The spread's floor is relative to the anchors' own magnitude, so scores of any scale (a
    perplexity of 5, a TracIn score of 1e-5) get bins of their own size.
    """
    a = np.asarray(anchor_oriented, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size < 2:
        raise FedqcError("the mixture rule needs at least 2 anchors with finite scores")
    spread = max(float(np.std(a)), 1e-3 * float(np.abs(a).max())) or 1e-3
    return np.linspace(a.min() - 10 * spread, a.max() + 3 * spread, num_bins + 1)


def histogram(oriented: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of finite scores per bin (outside values clipped into the end bins)."""
    x = np.asarray(oriented, dtype=np.float64)
    x = np.clip(x[np.isfinite(x)], edges[0], edges[-1])
    return np.histogram(x, bins=edges)[0].astype(np.int64)


@dataclass
class MixtureFit:
    tau: float
    clean_weight: float  # estimated share of clean samples in the federation
    clean_mean: float
    clean_std: float
    bad_mean: float
    bad_std: float


def fit_mixture(
    edges: np.ndarray, counts: np.ndarray, anchor_oriented: np.ndarray, iterations: int = 300
) -> MixtureFit:
    """EM for clean/corrupted Gaussians on binned scores, with anchors as labelled clean points."""
    x = (edges[:-1] + edges[1:]) / 2
    n = np.asarray(counts, dtype=np.float64)
    a = np.asarray(anchor_oriented, dtype=np.float64)
    a = a[np.isfinite(a)]
    if n.sum() == 0:
        raise FedqcError("the mixture rule got empty histograms: no client reported a score")
    floor = (edges[1] - edges[0]) / 2
    mu_c, sd_c = a.mean(), max(a.std(), floor)
    below = x < mu_c - 2 * sd_c
    mu_b = np.average(x[below], weights=n[below]) if n[below].sum() else mu_c - 4 * sd_c
    sd_b = max(np.sqrt(np.average((x - mu_b) ** 2, weights=n)), floor)
    pi_c = 0.5
    for _ in range(iterations):
        r = _posterior_clean(x, pi_c, mu_c, sd_c, mu_b, sd_b)
        wc, wb = n * r, n * (1 - r)
        pi_c = float(np.clip(wc.sum() / n.sum(), 1e-3, 1 - 1e-3))
        mu_c = (np.sum(wc * x) + a.sum()) / (wc.sum() + a.size)
        sd_c = max(
            np.sqrt((np.sum(wc * (x - mu_c) ** 2) + np.sum((a - mu_c) ** 2)) / (wc.sum() + a.size)),
            floor,
        )
        if wb.sum() > 0:
            mu_b = np.sum(wb * x) / wb.sum()
            sd_b = max(np.sqrt(np.sum(wb * (x - mu_b) ** 2) / wb.sum()), floor)
    tau = _crossing(pi_c, mu_c, sd_c, mu_b, sd_b, edges)
    return MixtureFit(float(tau), pi_c, float(mu_c), float(sd_c), float(mu_b), float(sd_b))


def _log_normal(x, mu, sd):
    return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd)


def _posterior_clean(x, pi_c, mu_c, sd_c, mu_b, sd_b):
    lc = np.log(pi_c) + _log_normal(x, mu_c, sd_c)
    lb = np.log(1 - pi_c) + _log_normal(x, mu_b, sd_b)
    return 1 / (1 + np.exp(np.clip(lb - lc, -500, 500)))


def _crossing(pi_c, mu_c, sd_c, mu_b, sd_b, edges) -> float:
    """The lowest score at or below the clean mean from which on clean is the likelier class."""
    grid = np.linspace(min(edges[0], mu_b), mu_c, 4001)
    clean = _posterior_clean(grid, pi_c, mu_c, sd_c, mu_b, sd_b) >= 0.5
    # walk down from the clean mean while clean stays likelier
    idx = len(grid) - 1
    while idx > 0 and clean[idx - 1]:
        idx -= 1
    return float(grid[idx])
