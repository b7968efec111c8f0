"""The synthetic arithmetic source and its `synthetic://` URI; hf:// routing."""

from __future__ import annotations

import re
from pathlib import Path

import fsspec
import pytest

from kimi_core.data import find_prepared, prepare_dataset, read_prepared, synthetic_rows, worked_solution
from kimi_core.data.sources import source_format
from kimi_core.data.synthetic import parse_synthetic_uri

PROBLEM = re.compile(r"^Compute (\d+)\+(\d+)\. Put the final answer in \\boxed\{\}\.$")


def _pairs(rows: list[dict]) -> set[frozenset[int]]:
    pairs = set()
    for row in rows:
        a, b = map(int, PROBLEM.match(row["prompt"][0]["content"]).groups())
        pairs.add(frozenset((a, b)))
    return pairs


def test_rows_are_dapo_format_and_correct() -> None:
    rows = synthetic_rows(seed=0, n=40, split="train")
    assert len(rows) == 40
    for row in rows:
        assert set(row) == {"prompt", "label"}
        (message,) = row["prompt"]
        assert message["role"] == "user"
        match = PROBLEM.match(message["content"])
        assert match, message["content"]
        a, b = map(int, match.groups())
        assert 0 <= a <= 9 and 0 <= b <= 9
        assert row["label"] == str(a + b)
        assert len(message["content"]) <= 50  # short: one token per byte for the tiny model
    assert len({row["prompt"][0]["content"] for row in rows}) == 40  # distinct problems


def test_deterministic_per_seed() -> None:
    assert synthetic_rows(seed=3, n=20, split="train") == synthetic_rows(seed=3, n=20, split="train")
    assert synthetic_rows(seed=3, n=20, split="train") != synthetic_rows(seed=4, n=20, split="train")


def test_train_and_eval_are_disjoint_even_up_to_commutation() -> None:
    train_all = synthetic_rows(seed=0, n=len(_pool("train", 30)), split="train", max_operand=30)
    eval_all = synthetic_rows(seed=1, n=len(_pool("eval", 30)), split="eval", max_operand=30)
    assert len(train_all) + len(eval_all) == 31 * 31  # the two splits partition every problem
    assert not _pairs(train_all) & _pairs(eval_all)
    assert 0.1 < len(eval_all) / (31 * 31) < 0.3  # about 20 % held out


def _pool(split: str, max_operand: int) -> list[tuple[int, int]]:
    from kimi_core.data.synthetic import _problem_pool

    return _problem_pool(split, max_operand)


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"holds \d+ distinct problems, asked for n=1000"):
        synthetic_rows(seed=0, n=1000, split="train")
    with pytest.raises(ValueError, match="split must be one of"):
        synthetic_rows(seed=0, n=1, split="test")


def test_worked_solution_shape() -> None:
    row = {"prompt": [{"role": "user", "content": "Compute 7+5. Put the final answer in \\boxed{}."}], "label": "12"}
    assert worked_solution(row) == "7+5=12\n</think>\nThe answer is \\boxed{12}."
    for row in synthetic_rows(seed=0, n=10, split="eval"):
        assert worked_solution(row).endswith(f"\\boxed{{{row['label']}}}.")
    with pytest.raises(ValueError, match="not a synthetic arithmetic row"):
        worked_solution({"prompt": "What is love?", "label": "x"})


def test_uri_parsing() -> None:
    spec = parse_synthetic_uri("synthetic://arith?seed=5&n=8&split=eval&max_operand=20")
    assert (spec.seed, spec.n, spec.split, spec.max_operand) == (5, 8, "eval", 20)
    assert parse_synthetic_uri("synthetic://arith?seed=1&n=2&split=train").max_operand == 9
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['size'\]"):
        parse_synthetic_uri("synthetic://arith?seed=1&n=2&split=train&size=3")
    with pytest.raises(ValueError, match=r"missing parameter\(s\) \['seed'\]"):
        parse_synthetic_uri("synthetic://arith?n=2&split=train")
    with pytest.raises(ValueError, match="'n' must be an integer"):
        parse_synthetic_uri("synthetic://arith?seed=1&n=two&split=train")
    with pytest.raises(ValueError, match="unknown synthetic source"):
        parse_synthetic_uri("synthetic://geometry?seed=1&n=2&split=train")


def test_prepare_synthetic_source(tmp_path: Path) -> None:
    uri = "synthetic://arith?seed=7&n=30&split=train&max_operand=12"
    assert find_prepared(uri, out_dir=tmp_path, name="arith-train") is None  # nothing prepared yet
    assert not any(tmp_path.iterdir())  # and the check wrote nothing
    result = prepare_dataset(uri, out_dir=tmp_path, name="arith-train")
    assert (result.rows_in, result.rows_out, result.duplicates) == (30, 30, 0)
    assert read_prepared(result.path) == synthetic_rows(seed=7, n=30, split="train", max_operand=12)
    again = prepare_dataset(uri, out_dir=tmp_path, name="arith-train")
    assert again.cached and find_prepared(uri, out_dir=tmp_path, name="arith-train") == again
    assert find_prepared(uri, out_dir=tmp_path, name="arith-train", on_error="skip") is None  # other options
    changed_uri = uri.replace("seed=7", "seed=8")
    assert find_prepared(changed_uri, out_dir=tmp_path, name="arith-train") is None
    changed = prepare_dataset(changed_uri, out_dir=tmp_path, name="arith-train")
    assert not changed.cached and changed.source_sha256 != result.source_sha256


def test_hf_urls_route_to_huggingface_filesystem() -> None:
    from huggingface_hub import HfFileSystem

    fs, path = fsspec.core.url_to_fs("hf://datasets/zhuzilin/dapo-math-17k/dapo-math-17k.jsonl")
    assert isinstance(fs, HfFileSystem)
    assert path == "datasets/zhuzilin/dapo-math-17k/dapo-math-17k.jsonl"
    assert source_format("hf://datasets/owner/repo/data/train-00000.parquet") == "parquet"
