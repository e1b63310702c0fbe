"""The calibrated threshold rules: split-conformal on anchors, and the histogram mixture fit."""

from __future__ import annotations

import re

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


# What each rule's printed promise must say, written out here per rule: its own assumption (or
# that it has none) and its own parameter. Each rule is given a different parameter, and each
# sentence must hold none of the other rules' marks, so two rules' sentences swapped fail.
TEN = np.array([*range(10), np.nan])  # 10 anchors with finite scores
PROMISES = {
    "anchor-conformal:0.2": (
        ["exchangeable with the 10 anchors", "at most 2/11 = 0.182 (≤ 0.2)"],
        {"0.2", "2/11", "0.182"},
    ),
    "anchor-gaussian:0.05": (
        ["the 10 anchors' and the clean samples' scores", "independent draws", "normal"],
        {"0.05"},
    ),
    "anchor-quantile:0.3": (["about 0.3 of clean samples", "no bound"], {"0.3"}),
    "anchor-mean": (["mean", "about half", "symmetric", "no bound"], set()),
    "mixture": (["two-component fit", "equally likely", "no bound"], set()),
    "drop-fraction:0.15": (
        ["each client drops", "lowest-scoring 0.15", "corrupted or not"],
        {"0.15"},
    ),
    "fixed:3.5": (["fixed τ = 3.5", "scorer's units", "no promise"], {"3.5"}),
}
MARKS = {  # words that belong to one rule's promise only
    "anchor-conformal:0.2": ["exchangeable", "at most"],
    "anchor-gaussian:0.05": ["normal", "independent draws"],
    "anchor-quantile:0.3": ["about 0.3"],
    "anchor-mean": ["half", "symmetric"],
    "mixture": ["two-component", "equally likely"],
    "drop-fraction:0.15": ["each client drops"],
    "fixed:3.5": ["fixed τ"],
}
PROMISING = ("anchor-conformal", "anchor-gaussian")  # those that state a rejection probability


def _numbers(text: str) -> set[str]:
    """The numbers a sentence states (fractions whole): '2/11', '0.182', '10', ..."""
    return set(re.findall(r"\d+/\d+|\d+(?:\.\d+)?", text))


@pytest.mark.parametrize("text", list(PROMISES))
def test_each_rules_promise_names_its_own_assumption_and_parameter(text):
    said = guarantee(parse_rule(text), TEN)
    phrases, numbers = PROMISES[text]
    for phrase in phrases:
        assert phrase in said, (text, phrase, said)
    others = {n for t, (_, ns) in PROMISES.items() if t != text for n in ns} - numbers
    assert numbers <= _numbers(said) and not others & _numbers(said), (text, said)
    for other, marks in MARKS.items():
        if other != text:
            assert not [m for m in marks if m in said], (text, other, said)
    promises = text.partition(":")[0] in PROMISING
    assert ("on average over anchor draws" in said) == promises  # the caveat: only where a
    assert ("approximate when the score depends on these anchors" in said) == promises  # rate is


@pytest.mark.parametrize(
    "alpha, anchors, bound",
    [(0.1, 9, "1/10 = 0.1"), (0.1, 10, "1/11 = 0.0909"), (0.1, 19, "2/20 = 0.1"),
     (0.1, 30, "3/31 = 0.0968"), (0.25, 10, "2/11 = 0.182"), (0.5, 4, "2/5 = 0.4")],
)  # fmt: skip
def test_the_conformal_promise_is_the_bound_for_its_anchor_count(alpha, anchors, bound):
    """k/(n+1) with k = ⌊α(n+1)⌋, the finite-sample bound, from the anchors that have scores."""
    scores = np.concatenate([np.arange(float(anchors)), [np.nan, np.inf]])
    said = guarantee(parse_rule(f"anchor-conformal:{alpha}"), scores)
    assert f"exchangeable with the {anchors} anchors" in said
    assert f"at most {bound} (≤ {alpha:g})" in said
    k = int(bound.split("/")[0])
    assert conformal_threshold(np.arange(float(anchors)), alpha) == k - 1  # the k-th smallest


def test_the_gaussian_promise_counts_the_anchors_it_used():
    said = guarantee(parse_rule("anchor-gaussian:0.1"), np.array([1.0, 2.0, np.nan, 4.0]))
    assert "if the 3 anchors' and the clean samples' scores" in said
    assert "rejected with probability 0.1;" in said
