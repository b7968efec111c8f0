"""Rule-based math rewards with the semantics of miles' rm_hub (miles@31f1ca961): 1 or 0.

- `deepscaler` (miles `get_deepscaler_rule_based_reward`): grades the text after the last
  `</think>`; without `</think>`, the text after the first `###Response` (up to a second one);
  with neither, 0. A label that is exactly `""` scores 0; a label containing `\\boxed` is reduced
  to its last box's content (0 if it has none).
- `math` (miles `grade_answer_verl`): grades the whole response; an empty (falsy) label scores 0;
  a label containing `\\boxed` is reduced as above.
The answer is the content of the last `\\boxed{...}` (see `extract.py`; `\\fbox`, `\\boxed {..}`
and `\\boxed 5` are no answer); it is graded by `grader.py` (miles' mathd then sympy graders).
Every call is bounded by `timeout_s` (default 1 s; miles has no limit): an answer whose sympy check
overruns scores 0 instead of stalling a rollout. The process-wide counters `grader_restarts()`
(worker crashes) and `grader_timeouts()` (checks over budget) are for the engine's metrics; a
symbolic worker that cannot start raises `GraderStartError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from kimi_core.rewards.extract import deepscaler_solution, last_boxed_content
from kimi_core.rewards.grader import fast_grade, symbolic_all
from kimi_core.rewards.symbolic import GraderStartError, default_checker, grader_restarts, grader_timeouts

RewardFn = Callable[[str, str], int]
_Label = str | int | float

# The symbolic check gets the call's budget minus this margin (process kill, bookkeeping).
_MARGIN_S = 0.03


def extract_deepscaler_answer(response: str) -> str | None:
    """The last boxed answer in the part deepscaler grades; None without that part or a box."""
    solution = deepscaler_solution(response)
    return None if solution is None else last_boxed_content(solution)


def extract_math_answer(response: str) -> str | None:
    """The last boxed answer anywhere in the response."""
    return last_boxed_content(response)


def _gold(label: _Label) -> str | None:
    """The label as a gold answer: a label holding `\\boxed` is reduced to its last box (or None)."""
    text = str(label)
    return last_boxed_content(text) if "\\boxed" in text else text


def _deepscaler_gold(label: _Label) -> str | None:
    return None if label == "" else _gold(label)


def _math_gold(label: _Label) -> str | None:
    return None if not label else _gold(label)


def _score(answer: str | None, gold: str | None, *, started: float, timeout_s: float) -> int:
    verdict = fast_grade(answer, gold)
    if isinstance(verdict, bool):
        return int(verdict)
    remaining = timeout_s - (time.monotonic() - started) - _MARGIN_S
    if remaining <= 0:
        return 0
    return int(symbolic_all(verdict, timeout_s=remaining, checker=default_checker()))


def deepscaler_reward(response: str, label: _Label, *, timeout_s: float = 1.0) -> int:
    """miles' deepscaler reward of `response` against `label` (see the module docstring)."""
    started = time.monotonic()
    answer = extract_deepscaler_answer(response)
    return _score(answer, _deepscaler_gold(label), started=started, timeout_s=timeout_s)


def math_reward(response: str, label: _Label, *, timeout_s: float = 1.0) -> int:
    """miles' math reward: the last `\\boxed{}` anywhere in `response` against `label`."""
    started = time.monotonic()
    return _score(extract_math_answer(response), _math_gold(label), started=started, timeout_s=timeout_s)


REWARD_FNS: dict[str, RewardFn] = {"deepscaler": deepscaler_reward, "math": math_reward}
_EXTRACTORS: dict[str, tuple[Callable[[str], str | None], Callable[[_Label], str | None]]] = {
    "deepscaler": (extract_deepscaler_answer, _deepscaler_gold),
    "math": (extract_math_answer, _math_gold),
}


def get_reward_fn(rm_type: str) -> RewardFn:
    """The reward function for a recipe's `rm_type`."""
    if rm_type not in REWARD_FNS:
        raise ValueError(f"unknown rm_type {rm_type!r}; valid: {sorted(REWARD_FNS)}")
    return REWARD_FNS[rm_type]


def score_batch(
    responses: Sequence[str], labels: Sequence[_Label], *, rm_type: str, timeout_s: float = 1.0
) -> list[int]:
    """Rewards for a batch: `[reward(responses[i], labels[i])]`, each bounded by `timeout_s`.

    Raises `GraderStartError` if an answer needs sympy and the worker cannot start.
    """
    get_reward_fn(rm_type)
    if len(responses) != len(labels):
        raise ValueError(f"{len(responses)} responses but {len(labels)} labels")
    extract, gold = _EXTRACTORS[rm_type]
    return [
        _score(extract(response), gold(label), started=time.monotonic(), timeout_s=timeout_s)
        for response, label in zip(responses, labels)
    ]


def start_grader() -> None:
    """Start the symbolic worker now (about 0.5 s) rather than on the first hard answer; raises
    `GraderStartError` if it cannot start."""
    default_checker().start()


__all__ = [
    "GraderStartError",
    "deepscaler_reward",
    "extract_deepscaler_answer",
    "extract_math_answer",
    "get_reward_fn",
    "grader_restarts",
    "grader_timeouts",
    "math_reward",
    "score_batch",
    "start_grader",
]
