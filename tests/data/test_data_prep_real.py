"""prepare_dataset on the real data sets in ../shared/data (skipped when they are absent)."""

from __future__ import annotations

import re
from pathlib import Path

from kimi_core.data import prepare_dataset, read_prepared


def _documented_sha256(shared_data: Path) -> dict[str, str]:
    """`{relative file: sha256}` from the provenance table in SOURCES.md."""
    text = (shared_data / "SOURCES.md").read_text(encoding="utf-8")
    return dict(re.findall(r"^\| `([^`]+\.jsonl)` \| [\d,]+ \| [\d,]+ \| `([0-9a-f]{64})` \|", text, re.M))


def test_dapo_math_17k(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "dapo-math-17k" / "dapo-math-17k.jsonl"
    result = prepare_dataset(str(source), out_dir=tmp_path, name="dapo-math-17k")
    assert (result.rows_in, result.rows_out, result.duplicates, result.errors) == (17290, 17290, 0, 0)
    assert result.source_sha256 == _documented_sha256(shared_data)["dapo-math-17k/dapo-math-17k.jsonl"]
    assert not result.cached
    rows = read_prepared(result.path)
    assert len(rows) == 17290
    first = rows[0]
    assert set(first) == {"prompt", "label"}
    assert first["prompt"][0]["role"] == "user"
    assert first["prompt"][0]["content"].startswith("Solve the following math problem step by step.")
    assert all(row["label"].lstrip("-").isdigit() for row in rows)  # SOURCES.md: all integer strings


def test_aime_2024_with_token_counts(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "aime-2024" / "aime-2024.jsonl"

    def count_bytes(messages: list[dict]) -> int:
        return sum(len(message["content"].encode("utf-8")) for message in messages)

    result = prepare_dataset(f"file://{source}", out_dir=tmp_path, name="aime-2024", count_tokens=count_bytes)
    assert (result.rows_in, result.rows_out, result.duplicates) == (30, 30, 0)
    assert result.source_sha256 == _documented_sha256(shared_data)["aime-2024/aime-2024.jsonl"]
    import json

    stats = json.loads(Path(result.stats_path).read_text())
    lengths = sorted(count_bytes(row["prompt"]) for row in read_prepared(result.path))
    # nearest rank over 30 values: p50 -> 15th, p90 -> 27th, p99 -> 30th
    assert stats["prompt_tokens"] == {"p50": lengths[14], "p90": lengths[26], "p99": lengths[29], "max": lengths[29]}
