"""Real labels from the recipe's data sets grade themselves correct and neighbours wrong."""

from __future__ import annotations

import json
from pathlib import Path

from kimi_core.rewards import deepscaler_reward, score_batch


def _labels(path: Path, limit: int) -> list[str]:
    with path.open() as f:
        return [json.loads(line)["label"] for _, line in zip(range(limit), f)]


def test_dapo_integer_labels(shared_data: Path) -> None:
    labels = _labels(shared_data / "dapo-math-17k" / "dapo-math-17k.jsonl", 300)
    right = [f"work...</think>\nAnswer: \\boxed{{{label}}}" for label in labels]
    wrong = [f"work...</think>\nAnswer: \\boxed{{{int(label) + 1}}}" for label in labels]
    assert score_batch(right, labels, rm_type="deepscaler") == [1] * len(labels)
    assert score_batch(wrong, labels, rm_type="deepscaler") == [0] * len(labels)


def test_math500_latex_labels_grade_themselves(shared_data: Path) -> None:
    labels = _labels(shared_data / "math-500" / "math-500.jsonl", 500)
    responses = [f"</think> so \\boxed{{ {label} }}" for label in labels]
    assert score_batch(responses, labels, rm_type="deepscaler") == [1] * len(labels)
    # display-style fractions and extra spaces are the same answer
    restyled = [f"</think>\\boxed{{{label.replace(chr(92) + 'frac', chr(92) + 'dfrac')}}}" for label in labels]
    scores = score_batch(restyled, labels, rm_type="deepscaler")
    assert scores == [1] * len(labels)
    assert deepscaler_reward(r"</think>\boxed{\left( 3, \frac{\pi}{2} \right)}", labels[0]) == 1
