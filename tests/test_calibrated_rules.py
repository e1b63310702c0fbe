"""The calibrated threshold rules: split-conformal on anchors, and the histogram mixture fit."""

from __future__ import annotations

import numpy as np
import pytest

from fedqc.errors import FedqcError
from fedqc.quality.mixture import fit_mixture, histogram, histogram_edges
from fedqc.quality.rules import (
    conformal_threshold,
    gaussian_threshold,
    global_threshold,
    guarantee,
    parse_rule,
)
from fedqc.scoring.scorers import SCORERS


def test_conformal_takes_the_floor_alpha_n_plus_1_th_smallest_anchor():
    anchors = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 8.0, 7.0, 6.0, 10.0])  # n = 10
    assert conformal_threshold(anchors, 0.1) == 1.0  # ⌊0.1·11⌋ = 1
    assert conformal_threshold(anchors, 0.2) == 2.0  # ⌊0.2·11⌋ = 2
    assert conformal_threshold(anchors, 0.5) == 5.0  # ⌊0.5·11⌋ = 5
    rule = parse_rule("anchor-conformal:0.2")
    assert global_threshold(rule, SCORERS["ira"], anchors) == 2.0


def test_conformal_refuses_an_alpha_the_anchors_cannot_support():
    with pytest.raises(FedqcError, match=r"needs at least 19 anchors.*has 10"):
        conformal_threshold(np.arange(10.0), 0.05)


def test_conformal_guarantee_holds_empirically():
    rng = np.random.default_rng(0)
    rejected = []
    for _ in range(4000):
        anchors = rng.normal(size=10)
        tau = conformal_threshold(anchors, 0.1)
        rejected.append(rng.normal() < tau)
    assert np.mean(rejected) <= 0.1 + 0.015  # P(reject a clean exchangeable sample) ≤ α


def test_mixture_finds_the_valley_without_the_contamination_rate():
    rng = np.random.default_rng(1)
    for bad_share in (0.2, 0.5, 0.8):
        n_bad = int(2000 * bad_share)
        clean = rng.normal(0.0, 1.0, 2000 - n_bad)
        bad = rng.normal(-8.0, 2.0, n_bad)
        anchors = rng.normal(0.0, 1.0, 10)
        edges = histogram_edges(anchors)
        counts = histogram(np.concatenate([clean, bad]), edges)
        fit = fit_mixture(edges, counts, anchors)
        assert -5.5 < fit.tau < -2.0, (bad_share, fit)
        assert abs(fit.clean_weight - (1 - bad_share)) < 0.05


def test_histogram_counts_every_finite_score_once():
    edges = np.linspace(0, 1, 5)
    counts = histogram(np.array([-3.0, 0.1, 0.5, 0.99, 7.0, np.nan, np.inf]), edges)
    assert counts.tolist() == [
        2,
        0,
        1,
        2,
    ]  # -3 and 7 are clipped into the end bins; nan, inf dropped
    assert counts.sum() == 5


def test_mixture_rule_parses_and_needs_histograms():
    rule = parse_rule("mixture")
    assert rule.needs_histograms and rule.needs_anchors
    with pytest.raises(ValueError):
        global_threshold(rule, SCORERS["ppl"], np.zeros(3))


def test_gaussian_is_the_lower_prediction_bound_of_the_anchor_scores():
    anchors = np.arange(10.0)  # mean 4.5, sd 3.0277; t(0.9; 9) = 1.3830 (tables)
    expected = 4.5 - 1.3830 * 3.02765 * np.sqrt(1 + 1 / 10)
    assert gaussian_threshold(anchors, 0.1) == pytest.approx(expected, abs=1e-3)
    rule = parse_rule("anchor-gaussian:0.1")
    assert global_threshold(rule, SCORERS["ira"], anchors) == pytest.approx(expected, abs=1e-3)
    with pytest.raises(FedqcError, match="needs at least 2 anchors"):
        gaussian_threshold(np.array([1.0]), 0.1)


def test_gaussian_rejects_alpha_of_normal_clean_samples_and_varies_less_than_conformal():
    rng = np.random.default_rng(0)
    rejected, taus = [], {"gaussian": [], "conformal": []}
    for _ in range(4000):
        anchors = rng.normal(size=10)
        tau = gaussian_threshold(anchors, 0.1)
        rejected.append(rng.normal() < tau)
        taus["gaussian"].append(tau)
        taus["conformal"].append(conformal_threshold(anchors, 0.1))
    assert abs(np.mean(rejected) - 0.1) < 0.015  # exact under normality
    assert np.std(taus["gaussian"]) < 0.8 * np.std(taus["conformal"])


def test_every_rule_states_what_it_promises():
    anchors = np.array([*range(10), np.nan])  # 10 anchors with finite scores
    assert "the 10 anchors" in guarantee(parse_rule("anchor-conformal:0.1"), anchors)
    assert "at most 0.1" in guarantee(parse_rule("anchor-conformal:0.1"), anchors)
    assert "normal" in guarantee(parse_rule("anchor-gaussian:0.05"), anchors)
    for text in ("anchor-mean", "anchor-quantile:0.1", "mixture", "fixed:3", "drop-fraction:0.2"):
        assert guarantee(parse_rule(text), anchors)
    assert guarantee(parse_rule("fixed:3"), None)
