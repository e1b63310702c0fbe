"""Threshold rules: parsing and τ on the oriented scale."""

from __future__ import annotations

import numpy as np
import pytest

from fedqc.errors import FedqcError
from fedqc.quality.rules import Rule, global_threshold, parse_rule
from fedqc.scoring.scorers import get_scorer

PPL = get_scorer("ppl")  # lower is better
IRA = get_scorer("ira")  # higher is better
# ppl of four anchors 2, 4, 6, 8 -> oriented -2, -4, -6, -8
ANCHORS = PPL.orient(np.array([2.0, 4.0, 6.0, 8.0]))


@pytest.mark.parametrize(
    "text,kind,value,is_global,needs_anchors",
    [
        ("anchor-mean", "anchor-mean", None, True, True),
        ("anchor-quantile:0.1", "anchor-quantile", 0.1, True, True),
        ("fixed:6.5", "fixed", 6.5, True, False),
        ("drop-fraction:0.3", "drop-fraction", 0.3, False, False),
    ],
)
def test_parse_rule(text, kind, value, is_global, needs_anchors):
    rule = parse_rule(text)
    assert rule == Rule(kind, value)
    assert rule.is_global is is_global and rule.needs_anchors is needs_anchors
    assert str(rule) == text


@pytest.mark.parametrize(
    "text",
    [
        "anchor-quantile",
        "anchor-quantile:",
        "anchor-quantile:1.5",
        "anchor-quantile:0",
        "drop-fraction:1",
        "drop-fraction:-0.1",
        "fixed:abc",
        "fixed",
        "anchor-mean:0.2",
        "foo",
        "",
    ],
)
def test_parse_rule_rejects(text):
    with pytest.raises(FedqcError, match="unknown threshold rule"):
        parse_rule(text)


def test_anchor_mean():
    assert global_threshold(parse_rule("anchor-mean"), PPL, ANCHORS) == pytest.approx(-5.0)


def test_anchor_quantile():
    # sorted -8, -6, -4, -2; linear interpolation at 0.1 * 3 = 0.3 -> -8 + 0.3 * 2
    tau = global_threshold(parse_rule("anchor-quantile:0.1"), PPL, ANCHORS)
    assert tau == pytest.approx(-7.4)


def test_fixed_is_in_the_scorers_units():
    assert global_threshold(parse_rule("fixed:6.5"), PPL, None) == pytest.approx(-6.5)
    assert global_threshold(parse_rule("fixed:6.5"), IRA, None) == pytest.approx(6.5)
    # keeping oriented >= tau means keeping ppl <= 6.5
    tau = global_threshold(parse_rule("fixed:6.5"), PPL, None)
    assert [bool(a >= tau) for a in ANCHORS] == [True, True, True, False]


def test_drop_fraction_has_no_global_threshold():
    assert global_threshold(parse_rule("drop-fraction:0.3"), PPL, ANCHORS) is None


def test_non_finite_anchors_are_ignored():
    anchors = np.array([-2.0, np.nan, -4.0, np.inf])
    assert global_threshold(parse_rule("anchor-mean"), PPL, anchors) == pytest.approx(-3.0)
    q = global_threshold(parse_rule("anchor-quantile:0.5"), PPL, anchors)
    assert q == pytest.approx(-3.0)


@pytest.mark.parametrize("anchors", [np.array([np.nan, np.nan]), np.array([]), None])
def test_no_finite_anchor_is_an_error(anchors):
    with pytest.raises(FedqcError, match="no anchor has a finite score"):
        global_threshold(parse_rule("anchor-mean"), PPL, anchors)
