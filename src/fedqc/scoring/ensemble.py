"""Ensembles of forward-only scorers, calibrated on the anchors: ``ensemble:ppl+ifd``.

Each component's oriented score is standardised by the anchors' median and standard deviation
(the anchors fix every component's scale), and the ensemble score is the mean of those z-scores:
higher is better. The server computes the calibration from its anchors and sends it with the
scorer settings, so clients combine their scores on exactly the anchors' scale.
"""

from __future__ import annotations

import numpy as np

from fedqc.errors import FedqcError
from fedqc.scoring.scorers import HIGHER_IS_BETTER, SCORERS, Scorer

PREFIX = "ensemble:"


def is_ensemble(name: str) -> bool:
    return name.startswith(PREFIX)


def components(name: str) -> list[Scorer]:
    parts = [p.strip() for p in name[len(PREFIX) :].split("+") if p.strip()]
    unknown = [p for p in parts if p not in SCORERS]
    if len(parts) < 2 or unknown or len(set(parts)) != len(parts):
        raise FedqcError(
            f"scorer '{name}': an ensemble names two or more different scorers joined by '+', "
            f"from {', '.join(SCORERS)} (e.g. ensemble:ppl+ifd)"
        )
    return [SCORERS[p] for p in parts]


def calibrate(name: str, cond_loss: np.ndarray, bare_loss: np.ndarray) -> list[float]:
    """[center_1, scale_1, center_2, scale_2, ...] from the anchors' losses."""
    calibration = []
    for scorer in components(name):
        with np.errstate(all="ignore"):
            oriented = scorer.orient(scorer.formula(cond_loss, bare_loss))
        finite = oriented[np.isfinite(oriented)]
        if finite.size < 2:
            raise FedqcError(f"scorer '{name}' needs at least 2 anchors with finite scores")
        calibration += [float(np.median(finite)), max(float(np.std(finite)), 1e-6)]
    return calibration


def ensemble_scorer(name: str, calibration: list[float]) -> Scorer:
    """The calibrated ensemble as an ordinary (higher-is-better) scorer."""
    parts = components(name)
    if len(calibration) != 2 * len(parts):
        raise ValueError(f"{name}: calibration needs {2 * len(parts)} numbers")
    centers, scales = np.array(calibration[0::2]), np.array(calibration[1::2])

    def formula(cond: np.ndarray, bare: np.ndarray) -> np.ndarray:
        z = [
            (p.orient(p.formula(cond, bare)) - c) / s
            for p, c, s in zip(parts, centers, scales, strict=True)
        ]
        return np.mean(z, axis=0)

    return Scorer(
        name,
        HIGHER_IS_BETTER,
        any(p.needs_bare for p in parts),
        formula,
        "mean of anchor-standardised scores of " + ", ".join(p.name for p in parts),
        [float(x) for x in calibration],
    )
