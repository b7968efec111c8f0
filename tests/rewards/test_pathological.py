"""Hostile outputs score 0 and never stall (the timeout marks are hang guards, not speed tests;
speed is measured in benchmarks/grading.py)."""

from __future__ import annotations

import random

import pytest

from kimi_core.rewards import deepscaler_reward, math_reward
from kimi_core.rewards.extract import last_boxed_content, matching_brace
from kimi_core.rewards.symbolic import SymbolicChecker

pytestmark = pytest.mark.timeout(60)


def _garbage(n: int) -> str:
    rng = random.Random(0)
    return "".join(rng.choice("{}\\boxed^_$ 0123456789abc</think>\u00e9\U0001f600") for _ in range(n))


def test_one_megabyte_of_garbage() -> None:
    garbage = _garbage(1_000_000)
    assert deepscaler_reward("</think>" + garbage, "5") == 0
    assert math_reward(garbage, "5") == 0


def test_nested_braces_100k_deep() -> None:
    nested = "{" * 100_000 + "1" + "}" * 100_000
    assert deepscaler_reward(rf"</think>\boxed{{{nested}}}", "1") == 0
    assert deepscaler_reward("</think>\\boxed{" + "{" * 100_000, "1") == 0
    assert last_boxed_content("\\boxed{" + nested + "}") == nested


def test_many_boxes_and_huge_box() -> None:
    assert deepscaler_reward("</think>" + "\\boxed{" * 200_000, "1") == 0
    assert deepscaler_reward("</think>\\boxed{" + "1" * 1_000_000 + "}", "1") == 0
    assert deepscaler_reward("</think>" * 150_000, "1") == 0


@pytest.mark.parametrize("answer", ["9^{9^{9^{9}}}", "((10!)!)!", "10^{10^{10}}"])
def test_explosive_expressions_score_zero(answer: str) -> None:
    assert deepscaler_reward(rf"</think>\boxed{{{answer}}}", r"\frac{1}{2}") == 0
    assert deepscaler_reward(rf"</think>\boxed{{{answer}}}", "7") == 0


def test_matching_brace_cases() -> None:
    assert matching_brace("{a{b}c}d", 0) == 6
    assert matching_brace("{a{b}c", 0) is None
    assert matching_brace("{" + "}" * 5, 0) == 1
    assert last_boxed_content(r"x \boxed{a} y \fbox{b}") == "a"
    assert last_boxed_content(r"\boxed{  3 }") == "  3 "
    assert last_boxed_content("nothing") is None


def test_checker_kills_an_overrunning_worker_and_recovers() -> None:
    checker = SymbolicChecker()
    try:
        checker.start()
        # Sent straight to sympy (the grader's screen would refuse it): a C-level big-int power.
        assert checker.check("9**9**9**9", "5", timeout_s=0.5) is False
        assert (checker.timeouts, checker.restarts) == (1, 0)  # an overrun is not a crash
        assert checker.check("1/2", "0.5", timeout_s=5.0) is True
        assert checker.check("3", "0.5", timeout_s=5.0) is False
    finally:
        checker.close()
