"""Metrics of generated answers: final number, final-line format, exact match, ROUGE-L.

Every expected value is computed by hand in the comment beside it.
"""

from __future__ import annotations

import math
from decimal import Decimal

import pytest

from fedqc.train.answers import answer_metrics, final_number, has_final_line, rouge_l


@pytest.mark.parametrize(
    "text, number",
    [
        ("so 5 + 3 = 8\n#### 8", Decimal(8)),
        ("#### 1,234", Decimal(1234)),
        ("#### $ 72.0", Decimal(72)),
        ("#### -3.5 apples", Decimal("-3.5")),
        ("#### 1\nno wait\n#### 2", Decimal(2)),  # the last one counts
        ("the answer is 8", None),
        ("#### eight", None),
    ],
)
def test_final_number(text, number):
    assert final_number(text) == number


@pytest.mark.parametrize(
    "text, final",
    [
        ("5 + 3 = 8\n#### 8", True),
        ("5 + 3 = 8\n####8\n\n", True),  # trailing blank lines do not count
        ("#### $1,000.50", True),
        ("x #### 8", False),  # not a line of its own
        ("#### 8 apples", False),  # something after the number
        ("#### 8\nQuestion: and then?", False),  # not the last line
        ("5 + 3 = 8", False),
        ("", False),
    ],
)
def test_final_line(text, final):
    assert has_final_line(text) is final


def test_exact_match_ignores_trailing_zeros_commas_and_dollars():
    refs = ["6 * 7 = 42\n#### 42", "... #### 1,000", "... #### 3", "... #### 5"]
    preds = [
        "6 * 7 = 42.0\n#### 42.0",  # 42.0 = 42: hit, final line
        "so $1000 in all\n#### $1000",  # 1000 = 1,000: hit, final line
        "the answer is 3",  # no #### at all: miss, no final line
        "x #### 5 apples",  # 5 = 5: hit, but not a final line
    ]
    got = answer_metrics(preds, refs)
    assert got["exact_match"] == 3 / 4
    assert got["answer_format"] == 2 / 4
    wrong = answer_metrics(["#### 9"] * 4, refs)
    assert wrong["exact_match"] == 0.0 and wrong["answer_format"] == 1.0


def test_rouge_l_on_hand_computed_pairs():
    # LCS of "the cat sat on the mat" and "the cat is on the mat": "the cat on the mat", 5 tokens
    # of 6 in each: P = R = F = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # The tokenizer lower-cases and keeps letters and digits: "####" and punctuation vanish.
    # "3 + 2 = 5 #### 5" -> [3, 2, 5, 5]; "He has 5. #### 5" -> [he, has, 5, 5]; LCS [5, 5]:
    # P = R = 2/4, F = 0.5.
    assert rouge_l("He has 5.\n#### 5", "3 + 2 = 5\n#### 5") == pytest.approx(0.5)
    assert rouge_l("Same Words", "same words") == 1.0
    assert rouge_l("", "#### 5") == 0.0


def test_rouge_l_is_the_mean_over_answers():
    refs = ["the cat is on the mat", "a b"]
    got = answer_metrics(["the cat sat on the mat", "c d"], refs)
    assert got["rouge_l"] == pytest.approx((5 / 6 + 0.0) / 2)
    assert got["exact_match"] == 0.0  # references without #### N: never a match


def test_no_answers_and_mismatched_lengths():
    assert all(math.isnan(v) for v in answer_metrics([], []).values())
    with pytest.raises(ValueError):
        answer_metrics(["#### 1"], [])
