"""The two normalizations and the fast grading rules, on hand examples (outputs as miles@31f1ca961)."""

from __future__ import annotations

import pytest

from kimi_core.rewards.grader import fast_grade, grade_answer
from kimi_core.rewards.normalize import mathd_normalize, split_tuple, str_is_int, sympy_normalize


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
        (r"\text{A}", "A"),
        ("ab = 5", "ab=5"),  # "ab " has 3 characters: not a variable prefix
        (r"5 \text{ cm} \text{ cm}", r"5 \text{ cm} \text{ cm}"),  # a failing step leaves it as it was
    ],
)
def test_mathd_normalize(raw: str, expected: str) -> None:
    assert mathd_normalize(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (r"\frac{1}{2}", "1/2"),
        (r"\frac{-1}{2}", "-1/2"),
        (r"\frac{\sqrt{3}}{2}", "sqrt(3)/2"),
        (r"\frac{a}{b+1}", "a/b+1"),  # pylatexenc writes no parentheses
        (r"\sqrt[3]{2}", "sqrt(2)"),
        ("5.0", "5"),
        ("1,000,000", "1000000"),
        (r"\text{Yes}", "yes"),
        (r"3 \text{ meters}", "3"),
        ("2^{10}", "2^10"),
        ("7 3/4", "7+3/4"),
        ("Monday", "mon"),
        (r"\left( 3, \frac{\pi}{2} \right)", "(3,pi/2)"),
    ],
)
def test_sympy_normalize(raw: str, expected: str) -> None:
    assert sympy_normalize(raw) == expected


def test_split_tuple_and_ints() -> None:
    assert split_tuple("(1,2)") == ["1", "2"]
    assert split_tuple("[0,1)") == ["0", "1"]
    assert split_tuple("(1)/(2)") == ["(1)/(2)"]
    assert split_tuple("") == []
    assert str_is_int("1,000") and str_is_int("5.0") and not str_is_int("0.5")


def test_fast_grade_verdicts() -> None:
    assert fast_grade("0.5", r"\frac{1}{2}") is True
    assert fast_grade("6", "5") is False
    assert fast_grade(None, "5") is False
    assert fast_grade("5", None) is False
    assert fast_grade(r"\sqrt{8}", r"2\sqrt{2}") == [("2sqrt(2)", "sqrt(8)")]
    assert fast_grade("9^{9^{9}}", "x") is False  # `^{` is never evaluated
    assert fast_grade("1" * 2000, "1") is False  # over the size cap
    assert grade_answer(r"\sqrt{8}", r"2\sqrt{2}", timeout_s=10.0) is True
