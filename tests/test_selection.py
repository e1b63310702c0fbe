"""Keep/drop decisions and their metrics."""

from __future__ import annotations

import numpy as np
import pytest

from fedqc.quality.selection import select, selection_metrics

NAN, INF = float("nan"), float("inf")


def test_select_with_tau_keeps_ties():
    sel = select(np.array([3.0, 1.0, 2.0, 2.0, 1.999]), tau=2.0)
    assert sel.keep.tolist() == [True, False, True, True, False]
    assert sel.kept == 3
    assert (sel.rejected_below_threshold, sel.rejected_non_finite) == (2, 0)


def test_select_rejects_non_finite_and_counts_them_apart():
    sel = select(np.array([3.0, NAN, INF, -INF, 0.0]), tau=1.0)
    assert sel.keep.tolist() == [True, False, False, False, False]
    assert sel.rejected_below_threshold == 1
    assert sel.rejected_non_finite == 3


@pytest.mark.parametrize(
    "fraction,keep",
    [
        (0.5, [True, False, False, True, False, True, False]),  # floor(0.5 * 5) = 2 dropped
        (0.3, [True, False, False, True, True, True, False]),  # floor(1.5) = 1
        (0.0, [True, True, False, True, True, True, False]),
        (0.99, [False, False, False, False, False, True, False]),  # floor(4.95) = 4
    ],
)
def test_select_drop_fraction(fraction, keep):
    scores = np.array([5.0, 1.0, NAN, 3.0, 2.0, 6.0, -INF])  # 5 finite
    sel = select(scores, drop_fraction=fraction)
    assert sel.keep.tolist() == keep
    n_drop = int(np.floor(fraction * 5))
    assert sel.rejected_below_threshold == n_drop
    assert sel.rejected_non_finite == 2
    assert sel.kept == 5 - n_drop


def test_select_needs_exactly_one_criterion():
    with pytest.raises(ValueError):
        select(np.array([1.0]))
    with pytest.raises(ValueError):
        select(np.array([1.0]), tau=0.0, drop_fraction=0.1)


@pytest.mark.parametrize(
    "keep,clean,expected",
    [
        # tp=2, kept 3, clean 3, agree on 3 of 5
        (
            [1, 1, 0, 0, 1],
            [1, 0, 1, 0, 1],
            {
                "precision": 2 / 3,
                "recall": 2 / 3,
                "f1": 2 / 3,
                "accuracy": 0.6,
                "kept_fraction": 0.6,
            },
        ),
        # tp=1, kept 1, clean 2, agree on 3 of 4
        (
            [1, 0, 0, 0],
            [1, 1, 0, 0],
            {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "accuracy": 0.75, "kept_fraction": 0.25},
        ),
        # nothing kept
        (
            [0, 0, 0],
            [1, 0, 0],
            {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 2 / 3, "kept_fraction": 0.0},
        ),
        # no samples at all
        (
            [],
            [],
            {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 0.0, "kept_fraction": 0.0},
        ),
    ],
)
def test_selection_metrics(keep, clean, expected):
    got = selection_metrics(np.array(keep, dtype=bool), np.array(clean, dtype=bool))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
