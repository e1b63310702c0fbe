"""Ensembles of forward-only scorers, calibrated on the anchors.

Each component's oriented score is standardised by the anchors' median and standard deviation
(the anchors fix every component's scale). Two ways to combine the z-scores, higher is better:

- ``ensemble:ppl+ifd`` - their mean;
- ``ensemble-min:cond-prob+ifd+end-loss`` - their minimum, the weakest link: a sample must look
  like the anchors to every component. Components that detect different corruptions (ℓ(r|q)
  deleted words, ifd an answer to another question, end-loss a cut answer) then add up instead of
  averaging out. A component with no value for a sample (end-loss of a truncated sample) is left
  out of its minimum.

The server fits the :class:`Calibration` on its anchors and sends it with the scorer settings, so
clients combine their scores on exactly the anchors' scale.
"""

from __future__ import annotations

import numpy as np

from fedqc.errors import FedqcError
from fedqc.scoring.formulas import ENSEMBLE_PREFIXES, HIGHER_IS_BETTER, SCORERS, Scorer

COMBINATIONS = dict(zip(ENSEMBLE_PREFIXES, ("mean", "min"), strict=True))


def is_ensemble(name: str) -> bool:
    return name.startswith(ENSEMBLE_PREFIXES)


def _split(name: str) -> tuple[str, list[str]]:
    prefix = next(p for p in COMBINATIONS if name.startswith(p))
    return prefix, [p.strip() for p in name[len(prefix) :].split("+") if p.strip()]


def components(name: str) -> list[Scorer]:
    prefix, parts = _split(name)
    unknown = [p for p in parts if p not in SCORERS]
    if len(parts) < 2 or unknown or len(set(parts)) != len(parts):
        raise FedqcError(
            f"scorer '{name}': an ensemble names two or more different scorers joined by '+', "
            f"from {', '.join(SCORERS)} (e.g. {prefix}ppl+ifd)"
        )
    return [SCORERS[p] for p in parts]


class Calibration:
    """The anchors' standardisation of an ensemble, in scikit-learn's fit/transform manner:
    :meth:`fit` on the anchors' losses sets ``calibration_`` ([center_1, scale_1, center_2, ...]:
    each component's median and standard deviation of its oriented score); :meth:`scorer` is the
    calibrated ensemble and :meth:`transform` its scores of any samples' losses."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.components = components(name)

    def fit(
        self, cond_loss: np.ndarray, bare_loss: np.ndarray, end_loss: np.ndarray | None = None
    ) -> Calibration:
        calibration = []
        for scorer in self.components:
            with np.errstate(all="ignore"):
                oriented = scorer.orient(scorer.formula(cond_loss, bare_loss, end_loss))
            finite = oriented[np.isfinite(oriented)]
            if finite.size < 2:
                hint = (
                    " (end-loss has no value for an anchor cut at model.max-length: raise it)"
                    if scorer.name == "end-loss"
                    else ""
                )
                raise FedqcError(
                    f"scorer '{self.name}' needs at least 2 anchors with a finite "
                    f"{scorer.name}{hint}"
                )
            calibration += [float(np.median(finite)), max(float(np.std(finite)), 1e-6)]
        self.calibration_ = calibration
        return self

    def scorer(self) -> Scorer:
        """The calibrated ensemble (fitted first)."""
        return ensemble_scorer(self.name, self.calibration_)

    def transform(
        self, cond_loss: np.ndarray, bare_loss: np.ndarray, end_loss: np.ndarray | None = None
    ) -> np.ndarray:
        """The calibrated ensemble's scores (raw = oriented: higher is better)."""
        with np.errstate(all="ignore"):
            return self.scorer().formula(cond_loss, bare_loss, end_loss).astype(np.float64)


def ensemble_scorer(name: str, calibration: list[float]) -> Scorer:
    """The calibrated ensemble as an ordinary (higher-is-better) scorer."""
    parts = components(name)
    combination = COMBINATIONS[_split(name)[0]]
    if len(calibration) != 2 * len(parts):
        raise ValueError(f"{name}: calibration needs {2 * len(parts)} numbers")
    centers, scales = np.array(calibration[0::2]), np.array(calibration[1::2])

    def formula(cond: np.ndarray, bare: np.ndarray, end: np.ndarray | None = None) -> np.ndarray:
        z = np.array(
            [
                (p.orient(p.formula(cond, bare, end)) - c) / s
                for p, c, s in zip(parts, centers, scales, strict=True)
            ]
        )
        if combination == "mean":
            return np.mean(z, axis=0)
        with np.errstate(all="ignore"):  # all components NaN: the minimum is NaN (rejected)
            return np.where(np.isnan(z).all(axis=0), np.nan, np.fmin.reduce(z, axis=0))

    label = "mean" if combination == "mean" else "minimum"
    return Scorer(
        name,
        HIGHER_IS_BETTER,
        any(p.needs_bare for p in parts),
        formula,
        f"{label} of anchor-standardised scores of " + ", ".join(p.name for p in parts),
        [float(x) for x in calibration],
    )
