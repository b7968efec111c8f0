"""One test per form on which an earlier grader disagreed with miles@31f1ca961 (rm_hub/deepscaler.py,
rm_hub/math_utils.py); each names the miles function that behaves that way."""

from __future__ import annotations

from kimi_core.rewards import deepscaler_reward, extract_deepscaler_answer, math_reward

T = "Let me think... </think> The answer follows.\nAnswer: "


def test_response_marker_without_think_end() -> None:
    # get_deepscaler_rule_based_reward: no `</think>` -> grade `response.split("###Response")[1]`.
    assert deepscaler_reward("plan ###Response so \\boxed{5}", "5") == 1
    assert deepscaler_reward("no marker at all \\boxed{5}", "5") == 0


def test_response_marker_grades_only_the_first_segment() -> None:
    # get_deepscaler_rule_based_reward: `split("###Response")[1]` is the text up to a second marker.
    response = "x ###Response a \\boxed{5} ###Response \\boxed{6}"
    assert extract_deepscaler_answer(response) == "5"
    assert deepscaler_reward(response, "5") == 1
    assert deepscaler_reward(response, "6") == 0


def test_fbox_is_no_answer() -> None:
    # extract_answer: returns None unless "\\boxed" is in the text, so a lone \fbox scores 0.
    assert deepscaler_reward(T + r"\fbox{12}", "12") == 0
    assert math_reward(r"\fbox{12}", "12") == 0


def test_boxed_with_space_before_brace_is_no_answer() -> None:
    # remove_boxed: the last box must start with "\\boxed{" exactly.
    assert deepscaler_reward(T + r"\boxed {12}", "12") == 0
    assert math_reward(r"\boxed {12}", "12") == 0


def test_braceless_boxed_is_no_answer() -> None:
    # last_boxed_only_string: no closing brace after the last \boxed -> None.
    assert deepscaler_reward(T + "\\boxed 7$", "7") == 0
    assert math_reward("\\boxed 7$", "7") == 0


def test_last_boxed_wins_over_a_later_fbox() -> None:
    # last_boxed_only_string: rfind("\\boxed") first; \fbox is only a fallback it never reaches here.
    assert deepscaler_reward(T + r"\boxed{1} \fbox{2}", "1") == 1
    assert deepscaler_reward(T + r"\boxed{1} \fbox{2}", "2") == 0


def test_label_with_unextractable_box_scores_zero() -> None:
    # _grade_boxed_solution: a "\\boxed" label that extract_answer cannot open is dropped -> 0.
    assert deepscaler_reward(T + r"\boxed{5}", r"\boxed 5") == 0
    assert math_reward(r"\boxed{5}", r"\boxed 5") == 0


def test_empty_box_against_blank_label() -> None:
    # _grade_boxed_solution rejects only label == "" (and a None answer); mathd_normalize_answer
    # strips both "" and "  " to "", so grade_answer_mathd finds them equal.
    assert deepscaler_reward(T + r"\boxed{}", "  ") == 1
    assert deepscaler_reward(T + r"\boxed{}", "") == 0
    assert math_reward(r"\boxed{ }", " ") == 1


def test_equation_prefix_counts_spaces() -> None:
    # _strip_string: "lhs = rhs" -> "rhs" only when lhs, spaces included, has at most 2 characters.
    assert deepscaler_reward(T + r"\boxed{x = 5}", "5") == 1
    assert deepscaler_reward(T + r"\boxed{ab = 5}", "5") == 0


def test_unlisted_unit_words_are_kept() -> None:
    # _normalize: only its 16 unit words are removed; "dollars", "km" stay and make it wrong.
    assert deepscaler_reward(T + r"\boxed{5 dollars}", "5") == 0
    assert deepscaler_reward(T + r"\boxed{5 km}", "5") == 0
    assert deepscaler_reward(T + r"\boxed{6 minutes}", "6") == 1


def test_unit_words_are_removed_inside_words() -> None:
    # _normalize: unit regexes have no word boundaries, so "Monday" becomes "mon".
    assert deepscaler_reward(T + r"\boxed{Mon}", "Monday") == 1


def test_integers_compare_after_float_rounding() -> None:
    # _normalize: a float-parsable integer becomes str(int(round(float(x)))).
    assert deepscaler_reward(T + r"\boxed{12345678901234567891}", "12345678901234567890") == 1
    assert deepscaler_reward(T + r"\boxed{4.99999999}", "5") == 1


def test_pi_counts_as_two_unknown_letters() -> None:
    # should_allow_eval: only "sqrt" and "frac" are exempt; x, p, i are 3 letters -> never sympy.
    assert deepscaler_reward(T + r"\boxed{x+\pi}", r"\pi+x") == 0
    assert deepscaler_reward(T + r"\boxed{\sin(x)}", r"\sin{x}") == 0


def test_sets_are_not_compared_as_sets() -> None:
    # _normalize + are_equal_under_sympy: "\{1,2\}" -> "1,2", a tuple difference sympy cannot take.
    assert deepscaler_reward(T + r"\boxed{\{1,2\}}", r"\{2,1\}") == 0


def test_mixed_number() -> None:
    # _inject_implicit_mixed_number: "7 3/4" -> "7+3/4", then sympy equals 31/4.
    assert deepscaler_reward(T + r"\boxed{7 3/4}", r"\frac{31}{4}", timeout_s=10.0) == 1


def test_integer_before_frac_is_a_mixed_number() -> None:
    # _parse_latex writes " \\frac" before rendering, so "1\frac{1}{2}" reads "1 1/2" -> "1+1/2".
    assert deepscaler_reward(T + r"\boxed{1\frac{1}{2}}", "1.5", timeout_s=10.0) == 1
    assert deepscaler_reward(T + r"\boxed{1\frac{1}{2}}", r"\frac{3}{2}", timeout_s=10.0) == 1


def test_empty_set_symbols() -> None:
    # _parse_latex (pylatexenc) renders \varnothing and \emptyset as the same symbol.
    assert deepscaler_reward(T + r"\boxed{\varnothing}", r"\emptyset") == 1
