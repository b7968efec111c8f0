"""Normalization and the fast grading rules, on hand examples."""

from __future__ import annotations

from fractions import Fraction

import pytest

from kimi_core.rewards.grader import NEEDS_SYMBOLIC, clean_label, fast_grade, grade_answer
from kimi_core.rewards.normalize import as_rational, hendrycks_normalize, plain_normalize, split_tuple


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\frac12", r"\frac{1}{2}"),
        (r"\frac1{72}", r"\frac{1}{72}"),
        (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt{3}}{2}"),
        ("0.5", r"\frac{1}{2}"),
        ("3/4", r"\frac{3}{4}"),
        (r"\sqrt3", r"\sqrt{3}"),
        (r"10^\circ", "10"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"5 \text{ cm}", "5"),
        (r"50\%", "50"),
        (r"\$7", "7"),
        ("k = 3", "3"),
        (".25", "0.25"),
    ],
)
def test_hendrycks_normalize(raw: str, expected: str) -> None:
    assert hendrycks_normalize(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (r"\frac{1}{2}", "1/2"),
        (r"\frac{-1}{2}", "-1/2"),
        (r"\frac{\sqrt{3}}{2}", "(sqrt(3))/2"),
        (r"\frac{a}{b+1}", "a/(b+1)"),
        (r"\sqrt[3]{2}", "(2)^(1/3)"),
        ("5.0", "5"),
        ("1,000,000", "1000000"),
        (r"\text{Yes}", "yes"),
        (r"3 \text{ meters}", "3"),
        ("2^{10}", "2^10"),
        ("7 3/4", "7+3/4"),
    ],
)
def test_plain_normalize(raw: str, expected: str) -> None:
    assert plain_normalize(raw) == expected


def test_split_tuple_and_rationals() -> None:
    assert split_tuple("(1,2)") == ["1", "2"]
    assert split_tuple("[0,1)") == ["0", "1"]
    assert split_tuple("(1)/(2)") == ["(1)/(2)"]
    assert split_tuple("") == []
    assert as_rational("-0.25") == Fraction(-1, 4)
    assert as_rational("3/6") == Fraction(1, 2)
    assert as_rational("sqrt(2)") is None


def test_fast_grade_verdicts() -> None:
    assert fast_grade("0.5", r"\frac{1}{2}") is True
    assert fast_grade("6", "5") is False
    assert fast_grade(None, "5") is False
    assert fast_grade("5", "") is False
    assert fast_grade(r"\sqrt{8}", r"2\sqrt{2}") is NEEDS_SYMBOLIC
    assert fast_grade("9^{9^{9}}", "x") is False  # too expensive to evaluate: wrong
    assert fast_grade("1" * 2000, "1") is False  # over the size cap
    assert grade_answer(r"\sqrt{8}", r"2\sqrt{2}") is True
    assert clean_label(r" \boxed{\frac{1}{2}} ") == r"\frac{1}{2}"
