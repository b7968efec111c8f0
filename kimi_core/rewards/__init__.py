"""Rule-based math rewards: 1 for a correct final answer, else 0 (DESIGN §7).

- `deepscaler`: 0 unless the response contains `</think>`; grades the last `\\boxed{}` after
  the last `</think>`.
- `math`: grades the last `\\boxed{}` anywhere in the response.
Grading (see `grader.py`) is Hendrycks-style normalization, exact numeric rules, then
math-verify/sympy in a worker process. Every call is bounded by `timeout_s` (default 1 s):
oversized, deeply nested or explosive answers score 0 instead of stalling a rollout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from kimi_core.rewards.extract import answer_region_after_think, last_boxed_content
from kimi_core.rewards.grader import NEEDS_SYMBOLIC, clean_label, fast_grade
from kimi_core.rewards.symbolic import default_checker

RewardFn = Callable[[str, str], int]

# The symbolic check gets the call's budget minus this margin (process kill, bookkeeping).
_MARGIN_S = 0.03


def extract_deepscaler_answer(response: str) -> str | None:
    """The last boxed answer after the last `</think>`; None without `</think>` or a box."""
    region = answer_region_after_think(response)
    return None if region is None else last_boxed_content(region)


def extract_math_answer(response: str) -> str | None:
    """The last boxed answer anywhere in the response."""
    return last_boxed_content(response)


def _score(answer: str | None, label: str, *, started: float, timeout_s: float) -> int:
    gold = clean_label(label)
    verdict = fast_grade(answer, gold)
    if verdict is not NEEDS_SYMBOLIC:
        return int(verdict)
    remaining = timeout_s - (time.monotonic() - started) - _MARGIN_S
    if remaining <= 0 or answer is None:
        return 0
    return int(default_checker().check(answer, gold, timeout_s=remaining))


def deepscaler_reward(response: str, label: str, *, timeout_s: float = 1.0) -> int:
    """1 if the last `\\boxed{}` after the last `</think>` equals `label`, else 0."""
    started = time.monotonic()
    return _score(extract_deepscaler_answer(response), label, started=started, timeout_s=timeout_s)


def math_reward(response: str, label: str, *, timeout_s: float = 1.0) -> int:
    """1 if the last `\\boxed{}` in the response equals `label`, else 0."""
    started = time.monotonic()
    return _score(extract_math_answer(response), label, started=started, timeout_s=timeout_s)


REWARD_FNS: dict[str, RewardFn] = {"deepscaler": deepscaler_reward, "math": math_reward}
_EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "deepscaler": extract_deepscaler_answer,
    "math": extract_math_answer,
}


def get_reward_fn(rm_type: str) -> RewardFn:
    """The reward function for a recipe's `rm_type`."""
    if rm_type not in REWARD_FNS:
        raise ValueError(f"unknown rm_type {rm_type!r}; valid: {sorted(REWARD_FNS)}")
    return REWARD_FNS[rm_type]


def score_batch(
    responses: Sequence[str], labels: Sequence[str], *, rm_type: str, timeout_s: float = 1.0
) -> list[int]:
    """Rewards for a batch: `[reward(responses[i], labels[i])]`, each bounded by `timeout_s`.

    All answers take the fast path first; only those it cannot decide visit the worker.
    """
    get_reward_fn(rm_type)
    if len(responses) != len(labels):
        raise ValueError(f"{len(responses)} responses but {len(labels)} labels")
    extract = _EXTRACTORS[rm_type]
    return [
        _score(extract(response), label, started=time.monotonic(), timeout_s=timeout_s)
        for response, label in zip(responses, labels)
    ]


def start_grader() -> None:
    """Start the symbolic worker now (about 0.5 s) rather than on the first hard answer."""
    default_checker().start()


__all__ = [
    "deepscaler_reward",
    "extract_deepscaler_answer",
    "extract_math_answer",
    "get_reward_fn",
    "math_reward",
    "score_batch",
    "start_grader",
]
