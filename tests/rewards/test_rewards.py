"""Math rewards: hand cases for the deepscaler / math semantics and the grading rules."""

from __future__ import annotations

import threading

import pytest

from kimi_core.rewards import (
    deepscaler_reward,
    extract_deepscaler_answer,
    get_reward_fn,
    math_reward,
    score_batch,
)

T = "Let me think... </think> The answer follows.\nAnswer: "


@pytest.mark.parametrize(
    ("response", "label", "expected"),
    [
        (T + r"\boxed{0.5}", r"\frac{1}{2}", 1),
        (T + r"\boxed{\frac{1}{2}}", "0.5", 1),
        (T + r"\boxed{ 204 }", "204", 1),
        (T + r"\boxed{1} wait, no: \boxed{2}", "2", 1),
        (T + r"\boxed{2} wait, no: \boxed{1}", "2", 0),
        (T + r"\boxed{\dfrac{3}{4}}", r"\frac34", 1),
        (T + r"\boxed{\tfrac12}", "0.5", 1),
        (T + r"\boxed{30^\circ}", "30", 1),
        (T + r"\boxed{30^{\circ}}", "30", 1),
        (T + r"\boxed{(1, 2)}", "(1,2)", 1),
        (T + r"\boxed{(2, 1)}", "(1,2)", 0),
        (T + r"\boxed{[0,1)}", "[0,1)", 1),
        (T + r"\boxed{[0,1]}", "[0,1)", 0),
        (T + r"\boxed{(1,2,3)}", "(1,2)", 0),
        (T + r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", 1),
        (T + r"\boxed{\$5.50}", "5.5", 1),
        (T + r"\boxed{10\%}", "10", 1),
        (T + r"\boxed{5 \text{ cm}}", "5", 1),
        (T + r"\boxed{x = 5}", "5", 1),
        (T + r"\boxed{1,000}", "1000", 1),
        (T + r"\boxed{5.0}", "5", 1),
        (T + r"\boxed{-\frac{1}{2}}", "-0.5", 1),
        (T + r"\boxed{\text{(A)}}", "A", 1),
        (T + r"\boxed{5}", r"\boxed{5}", 1),  # a boxed label is reduced to its content
    ],
)
def test_deepscaler_hand_cases(response: str, label: str, expected: int) -> None:
    assert deepscaler_reward(response, label) == expected


@pytest.mark.parametrize(
    ("answer", "label", "expected"),
    [
        ("2/4", r"\frac{1}{2}", 0),  # unreduced fraction: exact match required
        (r"\sqrt{4}", "2", 0),  # an integer label needs an integer-shaped answer
        ("0.333", r"\frac{1}{3}", 0),
        (r"\pi", "3.14", 0),
        ("6", "5", 0),
    ],
)
def test_wrong_answers_score_zero(answer: str, label: str, expected: int) -> None:
    assert deepscaler_reward(T + rf"\boxed{{{answer}}}", label) == expected


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
        (r"3\sqrt{2}", r"\sqrt{18}"),
        ("x^2+2x+1", "(x+1)^2"),
        (r"(3, \pi/2)", r"\left( 3, \frac{\pi}{2} \right)"),
    ],
)
def test_symbolic_equivalence(answer: str, label: str) -> None:
    assert deepscaler_reward(T + rf"\boxed{{{answer}}}", label) == 1
    assert math_reward(rf"\boxed{{{answer}}}", label) == 1


def test_deepscaler_needs_think_end_and_grades_after_the_last_one() -> None:
    assert deepscaler_reward(r"no thinking end \boxed{5}", "5") == 0
    assert math_reward(r"no thinking end \boxed{5}", "5") == 1
    # a box inside the thinking does not count for deepscaler
    assert deepscaler_reward(r"\boxed{5}</think> so the answer is 5", "5") == 0
    assert math_reward(r"\boxed{5}</think> so the answer is 5", "5") == 1
    assert deepscaler_reward(r"</think>\boxed{4}</think>\boxed{5}", "5") == 1
    assert deepscaler_reward(r"</think>\boxed{5}</think>no box", "5") == 0
    assert extract_deepscaler_answer(r"</think>\boxed{\frac{1}{2}}") == r"\frac{1}{2}"


@pytest.mark.parametrize(
    ("response", "label"),
    [
        (T + r"\boxed{5}", ""),
        (T + r"\boxed{5}", "   "),
        (T + r"\boxed{}", "5"),
        (T + "no box here, 5", "5"),
        (T + r"\boxed{5", "5"),  # truncated response: the last box never closes
        (T + "\\boxed{\udcff\u202e\U0001f600\u221e}", "5"),
        ("\x00\ufffd" * 1000 + "</think>\\boxed{\u00e9}", "5"),
    ],
)
def test_unscorable_is_zero(response: str, label: str) -> None:
    assert deepscaler_reward(response, label) == 0
    assert math_reward(response, label) == 0


def test_get_reward_fn_and_unknown_name() -> None:
    assert get_reward_fn("deepscaler") is deepscaler_reward
    assert get_reward_fn("math") is math_reward
    with pytest.raises(ValueError, match=r"valid: \['deepscaler', 'math'\]"):
        get_reward_fn("dapo")


def test_score_batch_matches_single_calls() -> None:
    responses = [T + r"\boxed{1}", r"\boxed{1}", T + r"\boxed{\sqrt{8}}", T + r"\boxed{0.5}"]
    labels = ["1", "1", r"2\sqrt{2}", r"\frac{1}{2}"]
    assert score_batch(responses, labels, rm_type="deepscaler") == [1, 0, 1, 1]
    assert score_batch(responses, labels, rm_type="math") == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="2 responses but 1 labels"):
        score_batch(["a", "b"], ["1"], rm_type="math")
    with pytest.raises(ValueError, match="unknown rm_type"):
        score_batch([], [], rm_type="nope")


def test_works_outside_the_main_thread() -> None:
    # math-verify's signal.alarm timeouts would fail here; the worker process makes it safe.
    results: list[int] = []
    thread = threading.Thread(
        target=lambda: results.append(deepscaler_reward(T + r"\boxed{\frac{\sqrt{3}}{3}}", r"\frac{1}{\sqrt{3}}"))
    )
    thread.start()
    thread.join()
    assert results == [1]
