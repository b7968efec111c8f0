"""Synthetic arithmetic prompts for the local recipe: small enough for a tiny model to learn on CPU.

Problems are sums `a+b` (`op=add`) or "the larger of a and b" (`op=max`, `a != b`) with
`0 <= a, b <= max_operand`. Rows use the DAPO format::

    {"prompt": [{"role": "user", "content": "Compute 7+5. Put the final answer in \\boxed{}."}],
     "label": "12"}
    {"prompt": [{"role": "user", "content": "max(12,47)? Answer in \\boxed{}."}], "label": "47"}

Prompts and worked solutions are short on purpose: the local tokenizer is byte-level (one token
per character), so every character costs compute in sampling and training.

Splits: an unordered pair {a, b} belongs to `eval` when `sha256("min+max") mod 100 < 20`,
else to `train`, whatever the seed; `a+b` and `b+a` therefore always share a split, and eval holds
only problems that training never sees. The seed only chooses which `n` problems of the split are
drawn (without replacement) and their order.

`prepare_dataset` reads this source from the URI
`synthetic://arith?seed=S&n=N&split=train|eval[&max_operand=M][&op=add|max]` (`max_operand`
defaults to 9, `op` to `add`). A tiny model learns `max` (compare two numbers, copy the larger)
from a few hundred examples and generalises to held-out pairs; 2-digit addition it does not.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

SPLITS = ("train", "eval")
EVAL_PERCENT = 20
DEFAULT_MAX_OPERAND = 9
_INSTRUCTION = "Put the final answer in \\boxed{}."
OPS = ("add", "max")
_PROBLEM = re.compile(r"^Compute (\d+)\+(\d+)\. ")
_MAX_INSTRUCTION = "Answer in \\boxed{}."
_MAX_PROBLEM = re.compile(r"^max\((\d+),(\d+)\)\? ")


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of a synthetic arithmetic source (see the module docstring)."""

    seed: int
    n: int
    split: str
    max_operand: int = DEFAULT_MAX_OPERAND
    op: str = "add"


def _row(a: int, b: int, op: str) -> dict[str, Any]:
    if op == "max":
        return {"prompt": [{"role": "user", "content": f"max({a},{b})? {_MAX_INSTRUCTION}"}],
                "label": str(max(a, b))}
    return {"prompt": [{"role": "user", "content": f"Compute {a}+{b}. {_INSTRUCTION}"}], "label": str(a + b)}


def _split_of(a: int, b: int) -> str:
    low, high = min(a, b), max(a, b)
    digest = hashlib.sha256(f"{low}+{high}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % 100 < EVAL_PERCENT else "train"


def _problem_pool(split: str, max_operand: int) -> list[tuple[int, int]]:
    return [
        (a, b)
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
        if _split_of(a, b) == split
    ]


def synthetic_rows(
    *, seed: int, n: int, split: str, max_operand: int = DEFAULT_MAX_OPERAND, op: str = "add"
) -> list[dict[str, Any]]:
    """`n` distinct DAPO-format rows of the `split`, deterministic for `seed`.

    Raises `ValueError` for an unknown split, `max_operand < 1`, `n < 1`, or `n` larger than the
    split holds (the message gives the split's size; raise `max_operand` for more problems).
    """
    if split not in SPLITS:
        raise ValueError(f"synthetic split must be one of {list(SPLITS)}, got {split!r}")
    if op not in OPS:
        raise ValueError(f"synthetic op must be one of {list(OPS)}, got {op!r}")
    if max_operand < 1:
        raise ValueError(f"synthetic max_operand must be >= 1, got {max_operand}")
    if n < 1:
        raise ValueError(f"synthetic n must be >= 1, got {n}")
    pool = [(a, b) for a, b in _problem_pool(split, max_operand) if op != "max" or a != b]
    if n > len(pool):
        raise ValueError(
            f"synthetic {split} split with max_operand={max_operand} holds {len(pool)} distinct problems, "
            f"asked for n={n}; lower n or raise max_operand"
        )
    chosen = random.Random(seed).sample(pool, n)
    return [_row(a, b, op) for a, b in chosen]


def worked_solution(row: dict[str, Any]) -> str:
    """A response in the K2.5 output shape for supervised warm-up, e.g. for 7+5 and max(12,47)::

        "7+5=12\\n</think>\\nThe answer is \\\\boxed{12}."
        "47</think>\\boxed{47}"

    The `max` solution is minimal (14 tokens with the stop token): the answer as the thought,
    then the boxed answer the deepscaler reward checks.

    The generation prompt already ends with `<think>`, so the response opens with the reasoning.
    Raises `ValueError` when `row` is not a synthetic arithmetic row.
    """
    prompt = row.get("prompt")
    content = prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        content = prompt[0].get("content")
    if isinstance(content, str) and (found := _MAX_PROBLEM.match(content)):
        a, b = int(found.group(1)), int(found.group(2))
        return f"{max(a, b)}</think>\\boxed{{{max(a, b)}}}"
    match = _PROBLEM.match(content) if isinstance(content, str) else None
    if match is None:
        raise ValueError(f"not a synthetic arithmetic row (expected 'Compute A+B. ...' or 'max(A,B)? ...'): {row!r:.120}")
    a, b = int(match.group(1)), int(match.group(2))
    return f"{a}+{b}={a + b}\n</think>\nThe answer is \\boxed{{{a + b}}}."


def parse_synthetic_uri(uri: str) -> SyntheticSpec:
    """Parse `synthetic://arith?seed=S&n=N&split=train|eval[&max_operand=M]`.

    Raises `ValueError` naming the bad or missing parameter and listing the valid ones.
    """
    parts = urlsplit(uri)
    if parts.scheme != "synthetic" or parts.netloc != "arith" or parts.path not in ("", "/"):
        raise ValueError(f"unknown synthetic source {uri!r}; the only one is synthetic://arith?seed=S&n=N&split=train")
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    valid = ("seed", "n", "split", "max_operand", "op")
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"{uri!r}: unknown parameter(s) {unknown}; valid: {list(valid)}")
    missing = [key for key in ("seed", "n", "split") if key not in params]
    if missing:
        raise ValueError(f"{uri!r}: missing parameter(s) {missing}; e.g. synthetic://arith?seed=0&n=64&split=train")
    ints: dict[str, int] = {}
    for key in ("seed", "n", "max_operand"):
        if key in params:
            try:
                ints[key] = int(params[key])
            except ValueError:
                raise ValueError(f"{uri!r}: parameter {key!r} must be an integer, got {params[key]!r}") from None
    return SyntheticSpec(
        seed=ints["seed"], n=ints["n"], split=params["split"],
        max_operand=ints.get("max_operand", DEFAULT_MAX_OPERAND), op=params.get("op", "add"),
    )


def rows_from_uri(uri: str) -> list[dict[str, Any]]:
    """The rows of a `synthetic://arith?...` source."""
    spec = parse_synthetic_uri(uri)
    return synthetic_rows(seed=spec.seed, n=spec.n, split=spec.split, max_operand=spec.max_operand, op=spec.op)
