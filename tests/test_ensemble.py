"""Ensemble scorers: components parsed, calibrated on anchors, combined as mean z-scores."""

from __future__ import annotations

import numpy as np
import pytest

from fedqc.errors import FedqcError
from fedqc.scoring.ensemble import calibrate, components, ensemble_scorer


def test_components_parse_and_reject_bad_names():
    assert [s.name for s in components("ensemble:ppl+ifd")] == ["ppl", "ifd"]
    for bad in ("ensemble:ppl", "ensemble:ppl+nope", "ensemble:ppl+ppl"):
        with pytest.raises(FedqcError, match="ensemble"):
            components(bad)


def test_ensemble_is_the_mean_of_anchor_standardised_oriented_scores():
    anchor_cond = np.array([1.0, 1.2, 0.8, 1.1])
    anchor_bare = np.array([2.0, 2.2, 1.9, 2.4])
    cal = calibrate("ensemble:cond-prob+ira", anchor_cond, anchor_bare)
    cond, bare = np.array([1.0, 3.0]), np.array([2.0, 3.1])
    expected = []
    for o_anchor, o in ((-anchor_cond, -cond), (anchor_bare - anchor_cond, bare - cond)):
        expected.append((o - np.median(o_anchor)) / np.std(o_anchor))
    scorer = ensemble_scorer("ensemble:cond-prob+ira", cal)
    np.testing.assert_allclose(scorer.formula(cond, bare), np.mean(expected, axis=0))
    assert scorer.direction == 1 and scorer.needs_bare
    assert (
        scorer.formula(cond, bare)[0] > scorer.formula(cond, bare)[1]
    )  # the worse sample ranks lower


def test_calibration_length_is_checked():
    with pytest.raises(ValueError):
        ensemble_scorer("ensemble:ppl+ifd", [0.0, 1.0])
