"""prepare_dataset on small files written by the tests: validation, dedup, formats, cache, crash safety."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kimi_core.data import DataValidationError, prepare_dataset, read_prepared


def _msg(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


GOOD = [
    {"prompt": _msg("What is 1+1?"), "label": "2"},
    {"prompt": _msg("What is 2+2?"), "label": "4"},
    {"prompt": "A plain string prompt", "label": "x"},
    {"prompt": _msg("What is 3+3?"), "label": "6"},
]


def _write_jsonl(path: Path, lines: list[object]) -> Path:
    """Write rows (dicts are JSON-encoded, strings are written verbatim) one per line."""
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def _listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


def test_good_rows_round_trip(tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "good.jsonl", GOOD)
    result = prepare_dataset(str(source), out_dir=tmp_path / "out", name="good")
    assert (result.rows_in, result.rows_out, result.duplicates, result.errors) == (4, 4, 0, 0)
    assert read_prepared(result.path) == GOOD  # prompts kept as given, string prompts included
    assert _listing(tmp_path / "out") == ["good.jsonl", "good.stats.json"]


def test_blank_lines_are_not_rows(tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "blank.jsonl", [GOOD[0], "", "   ", GOOD[1]])
    result = prepare_dataset(str(source), out_dir=tmp_path / "out", name="blank")
    assert (result.rows_in, result.rows_out) == (2, 2)


BAD_CASES = {
    "bad_json": ('{"prompt": "x", "label": ', "not valid JSON"),
    "not_object": ("[1, 2, 3]", "row must be a JSON object"),
    "missing_label": ({"prompt": _msg("no label here")}, "missing key 'label'"),
    "missing_prompt": ({"question": "q", "label": "1"}, "missing key 'prompt'"),
    "empty_string_prompt": ({"prompt": "  ", "label": "1"}, "empty prompt"),
    "empty_message_list": ({"prompt": [], "label": "1"}, "empty prompt"),
    "int_label": ({"prompt": _msg("int label"), "label": 12}, "label under key 'label' must be a string, got int 12"),
    "message_without_role": ({"prompt": [{"content": "hi"}], "label": "1"}, "prompt message 0 has no 'role'"),
    "content_not_string": ({"prompt": [{"role": "user", "content": 5}], "label": "1"}, "'content' must be a string"),
    "prompt_is_number": ({"prompt": 7, "label": "1"}, "must be a string or a list of chat messages"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_strict_names_file_and_line(case: str, tmp_path: Path) -> None:
    bad_line, reason = BAD_CASES[case]
    source = _write_jsonl(tmp_path / f"{case}.jsonl", [GOOD[0], GOOD[1], bad_line, GOOD[3]])
    with pytest.raises(DataValidationError) as caught:
        prepare_dataset(str(source), out_dir=tmp_path / "out", name=case)
    message = str(caught.value)
    assert f"{source}:3" in message
    assert reason in message
    assert isinstance(caught.value, ValueError)
    # crash safety: the failure happened mid-write; nothing (not even a temp file) is left
    assert _listing(tmp_path / "out") == []


def test_skip_counts_and_reports_bad_rows(tmp_path: Path) -> None:
    bad = [BAD_CASES[case][0] for case in sorted(BAD_CASES)]
    source = _write_jsonl(tmp_path / "mixed.jsonl", [GOOD[0], *bad, GOOD[1]])
    result = prepare_dataset(str(source), out_dir=tmp_path / "out", name="mixed", on_error="skip")
    assert (result.rows_in, result.rows_out, result.errors) == (len(bad) + 2, 2, len(bad))
    assert read_prepared(result.path) == [GOOD[0], GOOD[1]]
    stats = json.loads(Path(result.stats_path).read_text())
    examples = stats["error_examples"]
    assert len(examples) == 5  # only the first few are kept
    assert examples[0]["location"] == f"{source}:2"
    assert BAD_CASES[sorted(BAD_CASES)[0]][1] in examples[0]["reason"]


def test_skip_with_no_valid_rows_raises(tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "allbad.jsonl", ["nope", {"prompt": "", "label": "1"}])
    with pytest.raises(DataValidationError, match="no valid rows"):
        prepare_dataset(str(source), out_dir=tmp_path / "out", name="allbad", on_error="skip")
    assert _listing(tmp_path / "out") == []


def test_duplicates_and_conflicting_labels(tmp_path: Path) -> None:
    rows = [
        GOOD[0],
        GOOD[1],
        {"prompt": _msg("What is 1+1?"), "label": "2"},  # exact duplicate, same label
        {"prompt": _msg("What is 2+2?"), "label": "5"},  # duplicate prompt, conflicting label
        {"prompt": _msg("What is 2+2?"), "label": "4"},  # duplicate, agrees with the first
        {"prompt": "What is 1+1?", "label": "2"},  # a string prompt is not the same as a message list
    ]
    source = _write_jsonl(tmp_path / "dups.jsonl", rows)
    result = prepare_dataset(str(source), out_dir=tmp_path / "out", name="dups")
    assert (result.rows_in, result.rows_out, result.duplicates, result.conflicting_labels) == (6, 3, 3, 1)
    assert read_prepared(result.path) == [GOOD[0], GOOD[1], rows[5]]
    stats = json.loads(Path(result.stats_path).read_text())
    assert stats["conflicting_label_examples"] == [
        {"first": f"{source}:2", "first_label": "4", "duplicate": f"{source}:4", "duplicate_label": "5"}
    ]


def test_custom_keys_and_metadata(tmp_path: Path) -> None:
    rows = [
        {"question": "q1", "answer": "a1", "meta": {"id": 1}},
        {"question": "q2", "answer": "a2"},  # no metadata: allowed
    ]
    source = _write_jsonl(tmp_path / "custom.jsonl", rows)
    result = prepare_dataset(
        str(source), out_dir=tmp_path / "out", name="custom",
        input_key="question", label_key="answer", metadata_key="meta",
    )
    assert read_prepared(result.path) == [
        {"prompt": "q1", "label": "a1", "metadata": {"id": 1}},
        {"prompt": "q2", "label": "a2"},
    ]
    bad = _write_jsonl(tmp_path / "badmeta.jsonl", [{"question": "q", "answer": "a", "meta": [1]}])
    with pytest.raises(DataValidationError, match=r"badmeta.jsonl:1: metadata under key 'meta' must be an object"):
        prepare_dataset(str(bad), out_dir=tmp_path / "out", name="badmeta", input_key="question",
                        label_key="answer", metadata_key="meta")


def test_parquet_source(tmp_path: Path) -> None:
    table = pa.Table.from_pylist([GOOD[0], GOOD[1], GOOD[0], GOOD[3]])
    source = tmp_path / "rows.parquet"
    pq.write_table(table, source)
    result = prepare_dataset(str(source), out_dir=tmp_path / "out", name="pq")
    assert (result.rows_in, result.rows_out, result.duplicates) == (4, 3, 1)
    assert read_prepared(result.path) == [GOOD[0], GOOD[1], GOOD[3]]

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "ok", "label": "1"}, {"prompt": "ok2", "label": None}]), bad)
    with pytest.raises(DataValidationError, match=r"bad.parquet:row 1: label under key 'label' must be a string"):
        prepare_dataset(str(bad), out_dir=tmp_path / "out", name="badpq")


def test_gzip_jsonl_source(tmp_path: Path) -> None:
    import gzip

    source = tmp_path / "rows.jsonl.gz"
    source.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in GOOD).encode()))
    result = prepare_dataset(str(source), out_dir=tmp_path / "out", name="gz")
    assert read_prepared(result.path) == GOOD


def test_unknown_extension_and_bad_arguments(tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "rows.csv", GOOD)
    with pytest.raises(ValueError, match="cannot tell the format"):
        prepare_dataset(str(source), out_dir=tmp_path / "out", name="csv")
    with pytest.raises(ValueError, match="on_error must be"):
        prepare_dataset(str(source), out_dir=tmp_path / "out", name="x", on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name must be a plain file stem"):
        prepare_dataset(str(source), out_dir=tmp_path / "out", name="a/b")
    with pytest.raises(FileNotFoundError, match="data source not found"):
        prepare_dataset(str(tmp_path / "missing.jsonl"), out_dir=tmp_path / "out", name="missing")


def test_cache_hit_then_miss_when_source_changes(tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "cache.jsonl", GOOD)
    out = tmp_path / "out"
    first = prepare_dataset(str(source), out_dir=out, name="cache")
    output = Path(first.path)
    os.utime(output, (1_000_000_000, 1_000_000_000))  # a distinctive mtime a rewrite would change
    os.utime(first.stats_path, (1_000_000_000, 1_000_000_000))

    second = prepare_dataset(str(source), out_dir=out, name="cache")
    assert second.cached and not first.cached
    assert (second.rows_out, second.output_sha256, second.source_sha256) == (
        first.rows_out, first.output_sha256, first.source_sha256)
    assert output.stat().st_mtime == 1_000_000_000
    assert Path(first.stats_path).stat().st_mtime == 1_000_000_000

    other_options = prepare_dataset(str(source), out_dir=out, name="cache", on_error="skip")
    assert not other_options.cached

    _write_jsonl(source, [*GOOD, {"prompt": "one more", "label": "7"}])
    third = prepare_dataset(str(source), out_dir=out, name="cache", on_error="skip")
    assert not third.cached
    assert third.rows_out == 5 and third.source_sha256 != first.source_sha256
    assert output.stat().st_mtime != 1_000_000_000


def test_cache_miss_when_output_was_altered(tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "alter.jsonl", GOOD)
    first = prepare_dataset(str(source), out_dir=tmp_path / "out", name="alter")
    Path(first.path).write_text("truncated\n")
    again = prepare_dataset(str(source), out_dir=tmp_path / "out", name="alter")
    assert not again.cached
    assert read_prepared(again.path) == GOOD


def test_failed_reprep_keeps_previous_consistent_result(tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "keep.jsonl", GOOD)
    out = tmp_path / "out"
    first = prepare_dataset(str(source), out_dir=out, name="keep")
    _write_jsonl(source, [GOOD[0], "{broken"])
    with pytest.raises(DataValidationError, match=r"keep.jsonl:2: not valid JSON"):
        prepare_dataset(str(source), out_dir=out, name="keep")
    assert _listing(out) == ["keep.jsonl", "keep.stats.json"]  # no temp file left behind
    stats = json.loads(Path(first.stats_path).read_text())
    assert stats["output_sha256"] == first.output_sha256  # the old pair is untouched and consistent
    assert read_prepared(first.path) == GOOD


def test_output_is_deterministic(tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "det.jsonl", GOOD)
    one = prepare_dataset(str(source), out_dir=tmp_path / "a", name="det")
    two = prepare_dataset(str(source), out_dir=tmp_path / "b", name="det")
    assert Path(one.path).read_bytes() == Path(two.path).read_bytes()
    assert one.output_sha256 == two.output_sha256


def test_stdlib_json_fallback_writes_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kimi_core.data import rows as rowfmt

    rows = [*GOOD, {"prompt": "é 😀 \u2028 tab\t", "label": "ü", "meta": {"f": 0.1, "n": None}}]
    source = _write_jsonl(tmp_path / "fallback.jsonl", rows)
    fast = prepare_dataset(str(source), out_dir=tmp_path / "fast", name="f", metadata_key="meta")
    monkeypatch.setattr(rowfmt, "orjson", None)
    slow = prepare_dataset(str(source), out_dir=tmp_path / "slow", name="f", metadata_key="meta")
    assert fast.output_sha256 == slow.output_sha256
    expected = {"prompt": "é 😀 \u2028 tab\t", "label": "ü", "metadata": {"f": 0.1, "n": None}}
    assert read_prepared(slow.path)[-1] == expected
