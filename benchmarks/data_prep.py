"""Benchmark: prepare DAPO-Math-17k (17,290 rows, 10 MB) cold, with a byte-length token count, and cached.

Data: `../shared/data` beside the repository root, or `$KIMI_GRPO_SHARED_DATA`.
Goal: the cold preparation (no `count_tokens`) takes <= 3 s. Prints a table and ends with
`RESULT rows=<rows out> wall_s=<cold wall seconds>`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from kimi_core.data import prepare_dataset
from kimi_core.data.rows import orjson

GOAL_S = 3.0
RELATIVE = Path("dapo-math-17k") / "dapo-math-17k.jsonl"


def find_source() -> Path:
    for candidate in (os.environ.get("KIMI_GRPO_SHARED_DATA"), REPO_ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / RELATIVE).is_file():
            return Path(candidate) / RELATIVE
    sys.exit(f"data_prep benchmark: {RELATIVE} not found under ../shared/data; set KIMI_GRPO_SHARED_DATA")


def byte_length(messages: list[dict]) -> int:
    """A cheap token count: UTF-8 bytes of the message contents (the local byte-level tokenizer)."""
    return sum(len(message["content"].encode("utf-8")) for message in messages)


def timed(**kwargs: object) -> tuple[object, float]:
    started = time.perf_counter()
    result = prepare_dataset(**kwargs)  # type: ignore[arg-type]
    return result, time.perf_counter() - started


def main() -> None:
    source = find_source()
    megabytes = source.stat().st_size / 1e6
    with tempfile.TemporaryDirectory(prefix="kimi-data-prep-") as out_dir:
        cold, cold_s = timed(source=str(source), out_dir=out_dir, name="dapo")
        tokens, tokens_s = timed(source=str(source), out_dir=out_dir, name="dapo-tok", count_tokens=byte_length)
        cached, cached_s = timed(source=str(source), out_dir=out_dir, name="dapo")
    print(f"source: {source} ({megabytes:.2f} MB), json: {'orjson' if orjson else 'stdlib json'}")
    header = f"{'run':<28}{'rows in':>9}{'rows out':>10}{'dups':>6}{'errors':>8}{'wall s':>9}{'MB/s':>9}{'cached':>8}"
    print(header)
    print("-" * len(header))
    for label, result, seconds in (
        ("cold (no count_tokens)", cold, cold_s),
        ("cold + byte count_tokens", tokens, tokens_s),
        ("cached (2nd call)", cached, cached_s),
    ):
        print(f"{label:<28}{result.rows_in:>9}{result.rows_out:>10}{result.duplicates:>6}{result.errors:>8}"
              f"{seconds:>9.3f}{megabytes / seconds:>9.1f}{str(result.cached):>8}")
    verdict = "meets" if cold_s <= GOAL_S else "MISSES"
    print(f"goal: cold wall <= {GOAL_S:.1f} s -> {verdict} ({cold_s:.3f} s)")
    print(f"RESULT rows={cold.rows_out} wall_s={cold_s:.3f}")


if __name__ == "__main__":
    main()
