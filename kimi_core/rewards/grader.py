"""Is a model's answer equal to the gold answer? miles' two graders (miles@31f1ca961), reimplemented.

An answer is correct iff miles' `grade_answer_mathd` or `grade_answer_sympy` accepts it:
1. `grade_answer_mathd`: equal after `mathd_normalize` -> correct.
2. `grade_answer_sympy`, on `sympy_normalize`d text: equal -> correct; an empty answer -> wrong;
   split tuples / intervals (`split_tuple`): when the gold has several elements its first and last
   characters must match the answer's, and the element counts must agree; then per element:
   two fraction-shaped elements (`a/b`) must be equal strings (unreduced fractions are wrong); an
   integer-valued element needs an integer-valued partner and vice versa; anything else is
   correct iff sympy simplifies `(gold)-(given)` to 0, which is only tried when
   `sympy_eval_allowed` accepts the difference (at most 2 letters, no `^{`, `^(`, big powers);
   two integer literals are compared here, which is what sympy would answer.

Deviations, all towards 0 and all for bounded time (miles applies no time limit): the sympy step
runs in a worker process under the call's time budget, and an answer or gold over
`MAX_ANSWER_CHARS` characters or `MAX_BRACE_DEPTH` nesting skips step 2. Our `latex_to_plain`
stands in for pylatexenc in step 2 and agrees with it on the usual forms, not on every macro.
"""

from __future__ import annotations

import re
import time

from kimi_core.rewards.extract import max_brace_depth
from kimi_core.rewards.normalize import (
    is_frac_shaped,
    mathd_normalize,
    split_tuple,
    str_is_int,
    sympy_eval_allowed,
    sympy_normalize,
)
from kimi_core.rewards.symbolic import SymbolicChecker, default_checker

MAX_ANSWER_CHARS = 1000
MAX_BRACE_DEPTH = 50
_INT_LITERAL_RE = re.compile(r"^-?[0-9]+$")

SymbolicPairs = list[tuple[str, str]]  # (gold element, given element) pairs left for sympy


def fast_grade(given: str | None, gold: str | None) -> bool | SymbolicPairs:
    """Verdict without sympy: True / False, or the element pairs sympy must find equal (all of them)."""
    if given is None or gold is None:
        return False
    if mathd_normalize(given) == mathd_normalize(gold):
        return True
    for text in (given, gold):
        if len(text) > MAX_ANSWER_CHARS or max_brace_depth(text) > MAX_BRACE_DEPTH:
            return False
    plain_gold, plain_given = sympy_normalize(gold), sympy_normalize(given)
    if plain_gold == plain_given:
        return True
    if not plain_given:
        return False
    gold_elems, given_elems = split_tuple(plain_gold), split_tuple(plain_given)
    if len(gold_elems) > 1 and (plain_gold[0] != plain_given[0] or plain_gold[-1] != plain_given[-1]):
        return False
    if len(gold_elems) != len(given_elems):
        return False
    pending: SymbolicPairs = []
    for gold_elem, given_elem in zip(gold_elems, given_elems):
        if is_frac_shaped(gold_elem) and is_frac_shaped(given_elem):
            if gold_elem != given_elem:
                return False
        elif str_is_int(gold_elem) != str_is_int(given_elem):
            return False
        elif not sympy_eval_allowed(f"({gold_elem})-({given_elem})"):
            return False
        elif _INT_LITERAL_RE.match(gold_elem) and _INT_LITERAL_RE.match(given_elem):
            if int(gold_elem) != int(given_elem):  # sympy's own answer for two integer literals
                return False
        else:
            pending.append((gold_elem, given_elem))
    return pending or True


def grade_answer(
    given: str | None, gold: str | None, *, timeout_s: float = 1.0, checker: SymbolicChecker | None = None
) -> bool:
    """True iff `given` is the same answer as `gold`; bounded by about `timeout_s` seconds of sympy."""
    verdict = fast_grade(given, gold)
    if isinstance(verdict, bool):
        return verdict
    return symbolic_all(verdict, timeout_s=timeout_s, checker=checker)


def symbolic_all(pairs: SymbolicPairs, *, timeout_s: float, checker: SymbolicChecker | None = None) -> bool:
    """True iff sympy finds every (gold, given) pair equal; all checks share `timeout_s`."""
    checker = checker or default_checker()
    deadline = time.monotonic() + timeout_s
    for gold_elem, given_elem in pairs:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not checker.check(given_elem, gold_elem, timeout_s=remaining):
            return False
    return True
