"""Grading throughput and worst-case latency on recipe-shaped responses.

Builds a few thousand responses `...reasoning...</think> ... Answer: \\boxed{N}` with labels from
the recipe's data (dapo-math-17k integers, math-500 LaTeX answers) when `../shared/data` or
`$KIMI_GRPO_SHARED_DATA` is present, else synthetic labels. Mixes correct, wrong, restyled
LaTeX, symbolic-equivalent, no-think, no-box and pathological outputs; grades each with
`deepscaler_reward` and prints per-kind rate and latency. Baseline in the same run: math-verify
called directly in-process (`verify(parse(label), parse(response))`) on the non-pathological
responses (it cannot be given the pathological ones: nothing bounds its time off the main thread).

answers_per_s is measured on the recipe-shaped mix; the pathological outputs (two of which are
sent to sympy on purpose and cost a worker kill each) are timed for worst_case_s and shown in the
table with the throughput they drag the mix down to.

Usage: python benchmarks/grading.py [--n 4000] [--seed 0]
Last line: RESULT answers_per_s=<n> worst_case_s=<s>
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kimi_core.rewards import deepscaler_reward, start_grader

FILLER = "Let x be the unknown. We expand, simplify and check the cases carefully. "
SYMBOLIC_PAIRS = [  # (answer, label) equal only up to algebra
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
    (r"3\sqrt{2}", r"\sqrt{18}"),
    ("x^2+2x+1", "(x+1)^2"),
    (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}"),
]


def _data_dir() -> Path | None:
    for candidate in (os.environ.get("KIMI_GRPO_SHARED_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data"):
        if candidate and (Path(candidate) / "dapo-math-17k").is_dir():
            return Path(candidate)
    return None


def _labels(data: Path | None, rng: random.Random) -> tuple[list[str], list[str], str]:
    if data is None:
        ints = [str(rng.randint(0, 100_000)) for _ in range(2000)]
        latex = [rf"\frac{{{rng.randint(1, 9)}}}{{{rng.randint(11, 19)}}}" for _ in range(200)]
        return ints, latex, "synthetic"
    with (data / "dapo-math-17k" / "dapo-math-17k.jsonl").open() as f:
        ints = [json.loads(line)["label"] for line in f]
    with (data / "math-500" / "math-500.jsonl").open() as f:
        latex = [json.loads(line)["label"] for line in f]
    return ints, latex, str(data)


def _response(rng: random.Random, answer: str, *, think: bool = True, box: bool = True) -> str:
    reasoning = FILLER * rng.randint(10, 250)  # ~0.7-18 KB, like long chain-of-thought
    final = f"\\boxed{{{answer}}}" if box else answer
    return f"{reasoning}{'</think>' if think else ''}\n\nSo the result is {answer}.\nAnswer: {final}"


def _pathological() -> list[tuple[str, str]]:
    rng = random.Random(1)
    garbage = "".join(rng.choice("{}\\boxed^_$ 0123456789</think>\u00e9") for _ in range(1_000_000))
    nested = "{" * 100_000 + "1" + "}" * 100_000
    return [
        ("</think>" + garbage, "5"),
        (f"</think>\\boxed{{{nested}}}", "1"),
        ("</think>\\boxed{" + "{" * 100_000, "1"),
        ("</think>\\boxed{9^{9^{9^{9}}}}", r"\frac{1}{2}"),
        ("</think>\\boxed{((10!)!)!}", r"\frac{1}{2}"),  # reaches sympy: the worker is killed
        ("</think>\\boxed{((10!)!)!}", r"\frac{1}{3}"),
        ("</think>" + "\\boxed{" * 200_000, "1"),
        ("</think>\\boxed{\udcff\u202e\U0001f600}", "5"),
    ]


def build_cases(n: int, seed: int) -> tuple[list[tuple[str, str, str, int]], str]:
    """(kind, response, label, expected reward) rows."""
    rng = random.Random(seed)
    ints, latex, source = _labels(_data_dir(), rng)
    rows: list[tuple[str, str, str, int]] = []
    for _ in range(n):
        label = rng.choice(ints)
        kind = rng.choices(["correct", "wrong", "no_think", "no_box", "latex", "symbolic"], [40, 30, 8, 8, 12, 2])[0]
        if kind == "correct":
            rows.append((kind, _response(rng, f" {label} "), label, 1))
        elif kind == "wrong":
            rows.append((kind, _response(rng, str(int(label) + rng.randint(1, 9))), label, 0))
        elif kind == "no_think":
            rows.append((kind, _response(rng, label, think=False), label, 0))
        elif kind == "no_box":
            rows.append((kind, _response(rng, label, box=False), label, 0))
        elif kind == "latex":
            gold = rng.choice(latex)
            rows.append((kind, _response(rng, gold.replace("\\frac", "\\dfrac")), gold, 1))
        else:
            answer, gold = rng.choice(SYMBOLIC_PAIRS)
            rows.append((kind, _response(rng, answer), gold, 1))
    rows.extend(("pathological", response, label, 0) for response, label in _pathological())
    return rows, source


def run_ours(rows: list[tuple[str, str, str, int]]) -> dict[str, list[tuple[float, bool]]]:
    stats: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for kind, response, label, expected in rows:
        started = time.perf_counter()
        reward = deepscaler_reward(response, label)
        stats[kind].append((time.perf_counter() - started, reward == expected))
    return stats


def run_baseline(rows: list[tuple[str, str, str, int]], limit: int) -> tuple[int, float]:
    from math_verify import parse, verify

    sample = [row for row in rows if row[0] != "pathological"][:limit]
    started = time.perf_counter()
    for _, response, label, _ in sample:
        verify(parse(f"\\boxed{{{label}}}"), parse(response.split("</think>")[-1]))
    return len(sample), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="normal responses (8 pathological are added)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-n", type=int, default=300, help="responses for the math-verify baseline")
    args = parser.parse_args()

    rows, source = build_cases(args.n, args.seed)
    started = time.perf_counter()
    start_grader()
    startup = time.perf_counter() - started
    stats = run_ours(rows)

    print(f"labels: {source}; symbolic worker start-up (not in the figures below): {startup:.2f}s")
    print(f"{'kind':<14}{'n':>6}{'as expected':>13}{'mean ms':>10}{'max ms':>10}")
    all_times: list[float] = []
    typical_times: list[float] = []
    for kind, items in sorted(stats.items()):
        times = [t for t, _ in items]
        all_times.extend(times)
        if kind != "pathological":
            typical_times.extend(times)
        agree = sum(ok for _, ok in items)
        print(f"{kind:<14}{len(items):>6}{agree:>8}/{len(items):<4}{1000 * sum(times) / len(times):>10.3f}{1000 * max(times):>10.1f}")
    answers_per_s = len(typical_times) / sum(typical_times)
    mixed_per_s = len(all_times) / sum(all_times)
    worst = max(all_times)
    base_n, base_s = run_baseline(rows, args.baseline_n)
    print(f"{'ours, recipe-shaped mix':<30}{answers_per_s:>10.0f} answers/s  ({len(typical_times)} answers)")
    print(f"{'ours, + pathological':<30}{mixed_per_s:>10.0f} answers/s  (worst case {worst:.3f}s over {len(all_times)} answers)")
    print(f"{'baseline math-verify direct':<30}{base_n / base_s:>10.0f} answers/s  ({base_n} non-pathological answers)")
    print(f"RESULT answers_per_s={answers_per_s:.0f} worst_case_s={worst:.3f}")


if __name__ == "__main__":
    main()
