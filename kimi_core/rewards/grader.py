"""Is a model's answer equal to the label? Fast string/number rules first, symbolic last.

Decision order (the DeepScaleR / Hendrycks grader semantics the recipe uses):
1. equal after `hendrycks_normalize` -> correct;
2. equal after `plain_normalize` -> correct;
3. split tuples / intervals: the brackets and the element counts must agree;
4. per element: two `a/b` literals must match exactly (unreduced fractions are wrong); an
   integer label needs an integer-shaped answer and vice versa; two numeric literals
   (integers, decimals, fractions) compare as exact rationals (`0.5` == `1/2`);
5. anything left goes to math-verify (sympy) in a worker process under a time limit, unless
   the expression looks expensive to evaluate (power towers, large exponents, many unknowns),
   which counts as wrong, as in the reference grader.
"""

from __future__ import annotations

import re

from kimi_core.rewards.extract import last_boxed_content, max_brace_depth
from kimi_core.rewards.normalize import (
    as_rational,
    hendrycks_normalize,
    is_frac_shaped,
    is_int_shaped,
    plain_normalize,
    split_tuple,
)
from kimi_core.rewards.symbolic import SymbolicChecker, default_checker

MAX_ANSWER_CHARS = 1000
MAX_BRACE_DEPTH = 50
MAX_UNKNOWN_LETTERS = 2
_KNOWN_WORDS_RE = re.compile(r"sqrt|frac|pi|sin|cos|tan|log|ln|exp|inf")
_EXPENSIVE_RE = re.compile(r"\^\(|\^\{|\^[0-9]+\^|\^[0-9][0-9]+|[0-9]{3,}!|[0-9]{40,}")

NEEDS_SYMBOLIC = None  # fast_grade's "cannot decide without sympy" verdict


def clean_label(label: str) -> str:
    """The gold answer: a label holding `\\boxed{...}` is reduced to the box content."""
    label = str(label).strip()
    if "\\boxed" in label or "\\fbox" in label:
        return last_boxed_content(label) or ""
    return label


def fast_grade(given: str | None, gold: str) -> bool | None:
    """Verdict without sympy: True / False, or None (`NEEDS_SYMBOLIC`) when it must be checked."""
    if not given or not gold:
        return False
    for text in (given, gold):
        if len(text) > MAX_ANSWER_CHARS or max_brace_depth(text) > MAX_BRACE_DEPTH:
            return False
    if hendrycks_normalize(given) == hendrycks_normalize(gold):
        return True
    plain_given, plain_gold = plain_normalize(given), plain_normalize(gold)
    if plain_given == plain_gold:
        return True
    if not plain_given or not plain_gold:
        return False
    gold_elems, given_elems = split_tuple(plain_gold), split_tuple(plain_given)
    if len(gold_elems) > 1 and (plain_gold[0] != plain_given[0] or plain_gold[-1] != plain_given[-1]):
        return False
    if len(gold_elems) != len(given_elems):
        return False
    verdict: bool | None = True
    for given_elem, gold_elem in zip(given_elems, gold_elems):
        elem_verdict = _grade_element(given_elem, gold_elem)
        if elem_verdict is False:
            return False
        if elem_verdict is None:
            verdict = NEEDS_SYMBOLIC
    return verdict


def _grade_element(given: str, gold: str) -> bool | None:
    if given == gold:
        return True
    if is_frac_shaped(given) and is_frac_shaped(gold):
        return False
    if is_int_shaped(given) != is_int_shaped(gold):
        return False
    given_value, gold_value = as_rational(given), as_rational(gold)
    if given_value is not None and gold_value is not None:
        return given_value == gold_value
    if not (allows_symbolic(given) and allows_symbolic(gold)):
        return False
    return NEEDS_SYMBOLIC


def allows_symbolic(expr: str) -> bool:
    """False for plain-text expressions that sympy might take unbounded time to evaluate."""
    if _EXPENSIVE_RE.search(expr):
        return False
    letters = {ch for ch in _KNOWN_WORDS_RE.sub("", expr) if ch.isalpha()}
    return len(letters) <= MAX_UNKNOWN_LETTERS


def grade_answer(
    given: str | None, gold: str, *, timeout_s: float = 1.0, checker: SymbolicChecker | None = None
) -> bool:
    """True iff `given` is the same answer as `gold`; bounded by `timeout_s` seconds of sympy."""
    verdict = fast_grade(given, gold)
    if verdict is not NEEDS_SYMBOLIC:
        return verdict
    assert given is not None
    return (checker or default_checker()).check(given, gold, timeout_s=timeout_s)
