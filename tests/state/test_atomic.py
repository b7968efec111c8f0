"""kimi_core.atomic: the streaming writer replaces the target only on success."""

from __future__ import annotations

from pathlib import Path

import pytest

from kimi_core.atomic import TMP_MARK, open_atomic, write_text_atomic


def test_open_atomic_error_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError, match="boom"), open_atomic(target) as handle:
        handle.write(b"partial")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_open_atomic_streams_and_runs_before_replace(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.bin"
    seen: list[bool] = []
    with open_atomic(target, before_replace=lambda: seen.append(target.exists())) as handle:
        handle.write(b"a")
        handle.write(b"b")
        assert any(TMP_MARK in p.name for p in target.parent.iterdir())
    assert seen == [False]
    assert target.read_bytes() == b"ab"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]
